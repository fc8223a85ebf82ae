# A small character-level GPT that trains on a laptop CPU in under a minute (val loss ~1.78): what `make run` trains.
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_cpu.py
# The speedrun's modern recipe (config/shakespeare_char_speedrun_cpu.py, docs/SPEEDRUN.md) trained 400
# steps instead of 280: a lower loss than the classic recipe's 2000 steps (1.89) in well under half its time
# (docs/BENCHMARKS.md, "CPU training"). The classic recipe was: AdamW 1e-3, learned positions, GELU, 2000 steps.

out_dir = "out-shakespeare-char-cpu"
eval_interval = 100  # 5 evaluations over 400 iterations
eval_iters = 40  # 40 batches x 384 = 15,360 characters per split keeps each evaluation to about 2% of the run
log_interval = 50
always_save_checkpoint = False  # keep the best model by val loss

dataset = "shakespeare_char"
# 12 sequences of 64 characters per step, as 2 micro-batches of 6: one process per core on a 2-core CPU
# (forge/cpulaunch.py; the batches do not depend on the number of processes)
gradient_accumulation_steps = 2
batch_size = 6
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # 400 steps see 0.31 M characters, a third of an epoch: nothing to regularise
bias = False
rotary = True
qk_norm = True
mlp = "relu2"
untied_head = True
zero_init_proj = True
logit_softcap = 30.0

optimizer = "muon"  # Muon for the hidden matrices, AdamW for the rest (forge/optim.py)
muon_lr = 0.02
learning_rate = 6e-3
embedding_lr = 0.05
head_lr = 0.002
max_iters = 400  # val 1.78 (600 steps: 1.71 in 1.4x the time)
lr_decay_iters = 400
min_lr = 6e-4
warmup_iters = 30
beta2 = 0.99

device = "cpu"
compile = False  # compiling costs more than this whole run
matmul_precision = "medium"  # bf16 matmul products on CPUs with AMX/AVX512-BF16 (float32 elsewhere)
