/* One decode step of a Llama model whose matrices are GGUF blocks (Q8_0, Q4_0, Q4_1), for course_lib
   chapter 08b (hand-written; course_lib.c_step.build_c_step compiles it, see the notebook). Matvecs work as llama.cpp's do: the activation vector is quantized once to int8 blocks of 32
   (d = absmax/127, plus the integer block sum that Q4_0, Q4_1 and the unsigned Q8_0 trick need), then
   each weight block meets its activation block in an integer dot product, scaled once per block.
   Everything else (RMSNorm, RoPE, attention, SwiGLU, the residual stream, the KV cache) is float32.
   Compile with -DCOURSE_PORTABLE to force the plain-C loops instead of the AVX2 / AVX-512 VNNI ones. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__) && !defined(COURSE_PORTABLE)
#include <immintrin.h>
#define COURSE_SIMD 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && !defined(COURSE_NO_VNNI)
#define COURSE_VNNI 1   /* -DCOURSE_NO_VNNI: the AVX2 loops on a VNNI machine (for tests) */
#endif
#endif

enum { F32 = 0, Q8_0 = 1, Q4_0 = 2, Q4_1 = 3 };

typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, max_seq_len;
    int32_t wtype, emb_type, out_type;
    float norm_eps;
    const uint8_t *wqkv, *wo, *w13, *w2;              /* per layer, stacked: (n_layers, rows, row bytes) */
    const float *attention_norm, *ffn_norm, *norm;    /* (n_layers, dim), (n_layers, dim), (dim) */
    const uint8_t *tok_embeddings, *output;           /* (vocab, dim) in emb_type / out_type */
    const float *rope_cos, *rope_sin;                 /* (max_seq_len, head_dim/2) */
    float *cache_k, *cache_v;                         /* (n_layers, n_kv_heads, max_seq_len, head_dim) */
    float *x, *xb, *qkv, *att, *hb, *scores;          /* scratch */
    int8_t *xq; float *xd; int32_t *xi;               /* the quantized activation: values, d, sum per block */
} Model;

int course_simd(void) {
#ifdef COURSE_SIMD
#ifdef COURSE_VNNI
    return 2;    /* AVX2 shapes, VNNI's one-instruction u8 x s8 dot */
#else
    return 1;    /* AVX2 */
#endif
#else
    return 0;    /* portable C */
#endif
}

/* GGUF's block sizes come from the build (c_step.py passes course_lib's one table, GGML_BLOCKS). */
#if !defined(COURSE_QK) || !defined(COURSE_Q8_0_BYTES) || !defined(COURSE_Q4_0_BYTES) || !defined(COURSE_Q4_1_BYTES)
#error "build with -DCOURSE_QK=.. -DCOURSE_Q8_0_BYTES=.. -DCOURSE_Q4_0_BYTES=.. -DCOURSE_Q4_1_BYTES=.. (build_c_step does)"
#endif
#if COURSE_QK != 32
#error "the loops below handle blocks of 32 weights"
#endif
static int block_bytes(int type) {   /* F32: a 'block' of 32 floats */
    return type == Q8_0 ? COURSE_Q8_0_BYTES : type == Q4_0 ? COURSE_Q4_0_BYTES : type == Q4_1 ? COURSE_Q4_1_BYTES : 4 * COURSE_QK;
}
static size_t row_bytes(int type, int cols) { return type == F32 ? (size_t)cols * 4 : (size_t)(cols / 32) * block_bytes(type); }

static inline float half_to_float(const uint8_t *p) {   /* IEEE fp16, little-endian */
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef COURSE_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {                                    /* zero or subnormal: mant * 2^-24 */
        float f = (float)mant * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float f; memcpy(&f, &bits, 4);
    return f;
#endif
}

/* x (n) -> int8 blocks of 32: q = round(x / d), d = absmax / 127, s = sum(q) (an exact int). */
static void quantize_act(const float *x, int n, int8_t *q, float *d, int32_t *s) {
    for (int b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float db = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int v = (int)lrintf(xb[j] * id);            /* round half to even, as llama.cpp's SIMD path */
            q[32 * b + j] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = sum;
    }
}


/* The matrices are repacked once at load time (repack_rows8 in Python): 8 rows side by side, so one
   256-bit register holds 4 consecutive weights of each of 8 rows, and one u8 x s8 dot instruction adds
   4 products into each row's int32 lane. Per group of 8 rows and block of 32 columns:
     Q4_0: d[8] fp16 | 4 chunks of 32 bytes    (144 B = 8 x 18)
     Q4_1: d[8] fp16 | m[8] fp16 | 4 chunks    (160 B = 8 x 20)
     Q8_0: d[8] fp16 | 8 chunks of 32 bytes    (272 B = 8 x 34)
   4-bit chunk c, byte 4r+i = q[r][4c+i] | q[r][4c+16+i] << 4  (low nibbles: columns 4c.., high: 4c+16..)
   8-bit chunk t, byte 4r+i = q[r][4t+i] + 128                 (stored unsigned: the dot's u8 side) */
static int scale_bytes(int type) { return type == Q4_1 ? 32 : 16; }
static int group_bytes(int type) { return 8 * block_bytes(type); }

#ifdef COURSE_SIMD
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {   /* acc + 8 lanes of 4 u8*s8 products */
#ifdef COURSE_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else   /* AVX2: u8*s8 pairs summed to int16 (saturating: fine for |u| <= 128), then int16 pairs to int32 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

/* 8 outputs y[0..7] for one group of 8 rows: nb blocks of repacked weights . quantized activation. */
static void dot_group8(int type, const uint8_t *g, int nb, const int8_t *xq, const float *xd, const int32_t *xi,
                       float *y) {
    const int gb = group_bytes(type), sb = scale_bytes(type);
#ifdef COURSE_SIMD
    __m256 acc = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++, g += gb) {
        const uint8_t *qs = g + sb;
        const int32_t *x4 = (const int32_t *)(xq + 32 * b);          /* 8 groups of 4 activations */
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        int offset;
        if (type == Q8_0) {
#ifdef COURSE_VNNI
            for (int t = 0; t < 8; t += 2) {   /* (q + 128) . x, the 128 . x taken off below */
                s0 = dot4(s0, _mm256_loadu_si256((const __m256i *)(qs + 32 * t)), _mm256_set1_epi32(x4[t]));
                s1 = dot4(s1, _mm256_loadu_si256((const __m256i *)(qs + 32 * t + 32)), _mm256_set1_epi32(x4[t + 1]));
            }
            offset = 128;
#else       /* maddubs would saturate on 255 * 127 * 2: back to signed q, then |q| . (x with q's sign) */
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            for (int t = 0; t < 8; t++) {
                __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(qs + 32 * t)), flip);
                __m256i x = _mm256_set1_epi32(x4[t]);
                if (t & 1) s1 = dot4(s1, _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
                else s0 = dot4(s0, _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
            }
            offset = 0;
#endif
        } else {
            for (int c = 0; c < 4; c++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                s0 = dot4(s0, _mm256_and_si256(raw, low4), _mm256_set1_epi32(x4[c]));
                s1 = dot4(s1, _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), _mm256_set1_epi32(x4[c + 4]));
            }
            offset = type == Q4_0 ? 8 : 0;
        }
        /* sum_j (q_j - offset) x_j = dot - offset * sum_j x_j, exactly, in int32 */
        __m256i dot = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(offset * xi[b]));
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xd[b])), _mm256_cvtepi32_ps(dot), acc);
        if (type == Q4_1)   /* + m_w * d_x * sum_j x_j */
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16))),
                                  _mm256_set1_ps(xd[b] * (float)xi[b]), acc);
    }
    _mm256_storeu_ps(y, acc);
#else
    float acc[8] = {0};
    for (int b = 0; b < nb; b++, g += gb) {
        const uint8_t *qs = g + sb;
        const int8_t *x = xq + 32 * b;
        int32_t dot[8] = {0};
        if (type == Q8_0) {
            for (int t = 0; t < 8; t++)
                for (int r = 0; r < 8; r++)
                    for (int i = 0; i < 4; i++) dot[r] += qs[32 * t + 4 * r + i] * x[4 * t + i];
        } else {
            for (int c = 0; c < 4; c++)
                for (int r = 0; r < 8; r++)
                    for (int i = 0; i < 4; i++) {
                        int byte = qs[32 * c + 4 * r + i];
                        dot[r] += (byte & 0x0F) * x[4 * c + i] + (byte >> 4) * x[4 * c + 16 + i];
                    }
        }
        const int offset = type == Q8_0 ? 128 : type == Q4_0 ? 8 : 0;
        for (int r = 0; r < 8; r++) {
            acc[r] += half_to_float(g + 2 * r) * xd[b] * (float)(dot[r] - offset * xi[b]);
            if (type == Q4_1) acc[r] += half_to_float(g + 16 + 2 * r) * xd[b] * (float)xi[b];
        }
    }
    for (int r = 0; r < 8; r++) y[r] = acc[r];
#endif
}

/* y (rows) = W x. Quantized W: repacked groups of 8 rows, x already in m->xq/xd/xi. F32 W: plain rows, x in xf. */
static void matvec(const Model *m, int type, const uint8_t *w, int rows, int cols, const float *xf, float *y,
                   int n_threads) {
    const int nb = cols / 32;
    if (type == F32) {
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int r = 0; r < rows; r++) {
            const float *wr = (const float *)w + (size_t)r * cols; float acc = 0.0f;
            for (int j = 0; j < cols; j++) acc += wr[j] * xf[j];
            y[r] = acc;
        }
        return;
    }
    const int8_t *xq = m->xq; const float *xd = m->xd; const int32_t *xi = m->xi;
    const size_t gstride = (size_t)nb * group_bytes(type);
    const int n_groups = (rows + 7) / 8;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int gi = 0; gi < n_groups; gi++) {
        float out[8];
        dot_group8(type, w + gi * gstride, nb, xq, xd, xi, out);
        int n = rows - 8 * gi < 8 ? rows - 8 * gi : 8;               /* the last group may be padding */
        memcpy(y + 8 * gi, out, (size_t)n * sizeof(float));
    }
}

static void quantized_matvec(const Model *m, int type, const uint8_t *w, int rows, int cols, const float *x,
                             float *y, int n_threads) {
    if (type != F32) quantize_act(x, cols, m->xq, m->xd, m->xi);
    matvec(m, type, w, rows, cols, x, y, n_threads);
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = 0; j < n; j++) out[j] = x[j] * inv * w[j];
}

/* Row `token` of the embedding table: plain float32, or de-interleaved from the repacked groups. */
static void embed(const Model *m, int token, float *x) {
    const int dim = m->dim, type = m->emb_type;
    if (type == F32) { memcpy(x, (const float *)m->tok_embeddings + (size_t)token * dim, (size_t)dim * 4); return; }
    const int r = token % 8, nb = dim / 32, gb = group_bytes(type);
    const uint8_t *g = m->tok_embeddings + (size_t)(token / 8) * nb * gb;
    for (int b = 0; b < nb; b++, g += gb) {
        const uint8_t *qs = g + scale_bytes(type);
        float d = half_to_float(g + 2 * r), mn = type == Q4_1 ? half_to_float(g + 16 + 2 * r) : 0.0f;
        for (int j = 0; j < 32; j++) {
            float v;
            if (type == Q8_0) v = d * (float)(qs[32 * (j / 4) + 4 * r + j % 4] - 128);
            else {
                int byte = qs[32 * ((j % 16) / 4) + 4 * r + j % 4], q = j < 16 ? byte & 0x0F : byte >> 4;
                v = type == Q4_0 ? d * (float)(q - 8) : d * (float)q + mn;
            }
            x[32 * b + j] = v;
        }
    }
}

/* Meta's interleaved RoPE: pairs (v[2i], v[2i+1]) rotate by angle pos * theta_i. */
static void rope(float *v, int n_heads, int head_dim, const float *cos, const float *sin) {
    for (int h = 0; h < n_heads; h++) {
        float *p = v + h * head_dim;
        for (int i = 0; i < head_dim / 2; i++) {
            float a = p[2 * i], b = p[2 * i + 1];
            p[2 * i] = a * cos[i] - b * sin[i];
            p[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    }
}

int course_step(const Model *m, int token, int pos, float *logits, int n_threads) {
    if (token < 0 || token >= m->vocab_size || pos < 0 || pos >= m->max_seq_len) return -1;
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, hidden = m->hidden_dim;
    const int q_dim = nh * hd, kv_dim = nkv * hd, n_rep = nh / nkv, T = m->max_seq_len;
    const size_t qkv_bytes = (size_t)(q_dim + 2 * kv_dim) * row_bytes(m->wtype, dim);
    const size_t wo_bytes = (size_t)dim * row_bytes(m->wtype, q_dim);
    const size_t w13_bytes = (size_t)2 * hidden * row_bytes(m->wtype, dim);
    const size_t w2_bytes = (size_t)dim * row_bytes(m->wtype, hidden);
    const float *cos = m->rope_cos + (size_t)pos * (hd / 2), *sin = m->rope_sin + (size_t)pos * (hd / 2);
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = m->x, *xb = m->xb, *qkv = m->qkv, *att = m->att, *hb = m->hb;
    embed(m, token, x);
    for (int l = 0; l < m->n_layers; l++) {
        /* attention */
        rmsnorm(xb, x, m->attention_norm + (size_t)l * dim, dim, m->norm_eps);
        quantized_matvec(m, m->wtype, m->wqkv + l * qkv_bytes, q_dim + 2 * kv_dim, dim, xb, qkv, n_threads);
        float *q = qkv, *k = qkv + q_dim, *v = qkv + q_dim + kv_dim;
        rope(q, nh, hd, cos, sin);
        rope(k, nkv, hd, cos, sin);
        float *ck = m->cache_k + (size_t)l * nkv * T * hd, *cv = m->cache_v + (size_t)l * nkv * T * hd;
        for (int g = 0; g < nkv; g++) {
            memcpy(ck + ((size_t)g * T + pos) * hd, k + g * hd, (size_t)hd * 4);
            memcpy(cv + ((size_t)g * T + pos) * hd, v + g * hd, (size_t)hd * 4);
        }
        for (int h = 0; h < nh; h++) {
            const float *qh = q + h * hd, *kh = ck + (size_t)(h / n_rep) * T * hd, *vh = cv + (size_t)(h / n_rep) * T * hd;
            float *sc = m->scores, mx = -INFINITY, sum = 0.0f, *out = att + h * hd;
            for (int t = 0; t <= pos; t++) {
                float s = 0.0f;
                for (int j = 0; j < hd; j++) s += qh[j] * kh[(size_t)t * hd + j];
                sc[t] = s * scale;
                mx = fmaxf(mx, sc[t]);
            }
            for (int t = 0; t <= pos; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
            for (int j = 0; j < hd; j++) out[j] = 0.0f;
            for (int t = 0; t <= pos; t++) {
                float p = sc[t] / sum;
                for (int j = 0; j < hd; j++) out[j] += p * vh[(size_t)t * hd + j];
            }
        }
        quantized_matvec(m, m->wtype, m->wo + l * wo_bytes, dim, q_dim, att, xb, n_threads);
        for (int j = 0; j < dim; j++) x[j] += xb[j];
        /* feed-forward */
        rmsnorm(xb, x, m->ffn_norm + (size_t)l * dim, dim, m->norm_eps);
        quantized_matvec(m, m->wtype, m->w13 + l * w13_bytes, 2 * hidden, dim, xb, hb, n_threads);
        for (int j = 0; j < hidden; j++) {
            float g = hb[j];
            hb[j] = g / (1.0f + expf(-g)) * hb[hidden + j];   /* SwiGLU: silu(w1 x) * (w3 x) */
        }
        quantized_matvec(m, m->wtype, m->w2 + l * w2_bytes, dim, hidden, hb, xb, n_threads);
        for (int j = 0; j < dim; j++) x[j] += xb[j];
    }
    if (logits) {
        rmsnorm(xb, x, m->norm, dim, m->norm_eps);
        quantized_matvec(m, m->out_type, m->output, m->vocab_size, dim, xb, logits, n_threads);
    }
    return 0;
}

/* y = W x for one repacked matrix (for tests and the notebook's per-matvec timings). */
int course_matvec(int type, const uint8_t *w, int rows, int cols, const float *x, float *y, int8_t *xq, float *xd,
                  int32_t *xi, int n_threads) {
    Model m; memset(&m, 0, sizeof m);
    m.xq = xq; m.xd = xd; m.xi = xi;
    quantized_matvec(&m, type, w, rows, cols, x, y, n_threads);
    return 0;
}
