# A small character-level GPT that trains on a laptop CPU in minutes (about 1.88 val loss).
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_cpu.py

out_dir = "out-shakespeare-char-cpu"
eval_interval = 250  # 8 evaluations over 2000 iterations
eval_iters = 20  # 20 batches per split keeps each evaluation to about 2% of the run
log_interval = 10
always_save_checkpoint = False  # keep the best model by val loss

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
mlp = "gelu_exact"  # classic nanoGPT's erf GELU: ~2.5x cheaper than GPT-2's tanh form on a CPU, same loss

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False  # measured: no faster per step on this model, and compiling costs tens of seconds
matmul_precision = "medium"  # bf16 matmul products, fp32 accumulation, on CPUs with AMX/AVX512-BF16 (else fp32)
