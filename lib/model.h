/*
 * The frozen base model: architecture, weight pointers and their backing
 * storage.  Weights are row-major [out, in] as in PyTorch's nn.Linear.
 */
#ifndef LIBPERL_MODEL_H
#define LIBPERL_MODEL_H

#include "internal.h"

typedef struct layer_weights {
    float *attn_norm; /* [dim] */
    float *wq;        /* [n_heads * head_dim, dim] */
    float *wk;        /* [n_kv_heads * head_dim, dim] */
    float *wv;        /* [n_kv_heads * head_dim, dim] */
    float *wo;        /* [dim, n_heads * head_dim] */
    float *bq;        /* [n_heads * head_dim] or NULL */
    float *bk;        /* [n_kv_heads * head_dim] or NULL */
    float *bv;        /* [n_kv_heads * head_dim] or NULL */
    float *ffn_norm;  /* [dim] */
    float *w_gate;    /* [hidden_dim, dim]  (llama2.c w1) */
    float *w_up;      /* [hidden_dim, dim]  (llama2.c w3) */
    float *w_down;    /* [dim, hidden_dim]  (llama2.c w2) */
} layer_weights;

typedef struct model_weights {
    float *tok_emb;    /* [vocab, dim] */
    layer_weights *layers; /* [n_layers] */
    float *final_norm; /* [dim] */
    float *lm_head;    /* [vocab, dim]; equals tok_emb when tied */
} model_weights;

/* A region that holds weights: an mmap'd file or an owned allocation. */
typedef struct model_backing {
    void *addr;
    size_t len;
    int is_mmap;
} model_backing;

struct perl_model {
    perl_model_config cfg;     /* head_dim always resolved (> 0) */
    model_weights w;           /* read-only base weights */
    float *rope_cos;           /* [max_seq_len, head_dim / 2] */
    float *rope_sin;
    model_backing *backing;
    int n_backing;
    char *source_path;         /* for adapter_config.json base_model_name_or_path */
};

/* One named tensor of the HF layout and where its pointer lives. */
typedef struct tensor_slot {
    char name[128];   /* HF name, e.g. "model.layers.3.self_attn.q_proj.weight" */
    int ndim;
    int64_t shape[2];
    float **ptr;      /* address of the pointer inside a model_weights */
} tensor_slot;

/* Resolves defaults (head_dim) and validates dimensions; absurd values fail. */
int model_config_validate(perl_model_config *cfg);

/* Allocates an empty model (layers array, no weights) for cfg; validates cfg. */
int model_alloc(perl_model **out, const perl_model_config *cfg);

/* Enumerates the tensors of cfg in HF naming, pointing into *w.  With tied
 * embeddings no lm_head slot is listed (w->lm_head must be set = tok_emb).
 * *out is allocated with perl_mem_alloc; *count receives its length. */
int model_tensor_slots(const perl_model_config *cfg, model_weights *w, tensor_slot **out,
                       int *count);

/* Total floats of all slots of cfg. */
size_t model_weights_count(const perl_model_config *cfg);

/* Points every slot of *w into one owned buffer of model_weights_count floats. */
void model_weights_point(const perl_model_config *cfg, model_weights *w, float *buffer);

/* Adds a backing region the model releases on free. */
int model_add_backing(perl_model *m, void *addr, size_t len, int is_mmap);

/* Precomputes the RoPE tables (call once weights/config are final). */
int model_init_rope(perl_model *m);

/* Ensures w->lm_head = w->tok_emb when tied. */
void model_weights_tie(const perl_model_config *cfg, model_weights *w);

/* Loaders (llama2c.c, hf_model.c). */
int model_load_llama2c(perl_model **out, const char *path);
int model_load_hf(perl_model **out, const char *dir);
int model_save_hf_weights(const perl_model_config *cfg, const model_weights *w,
                          const char *dir);

#endif /* LIBPERL_MODEL_H */
