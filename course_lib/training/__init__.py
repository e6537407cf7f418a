"""Chapter 13's training package (hand-written index). Placeholder on branch `prune`: the lead's index replaces it at merge."""
