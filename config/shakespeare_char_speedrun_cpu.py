# Speedrun: Tiny Shakespeare characters to val loss <= 1.886 in 30 s or less on a 2-core CPU, counted
# from process start (the classic CPU recipe, nanoGPT's baby GPT as bench/cpu.py runs it, needs 89 s). How and why:
# docs/SPEEDRUN.md; measured figures: docs/BENCHMARKS.md ("Speed records").
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_speedrun_cpu.py

out_dir = "out-shakespeare-char-speedrun-cpu"
# Every evaluation is on the clock, so there is one: of the val split only, at the end, where the
# decayed lr leaves the best model of the run (the evaluations at step 0 and of the train split cost
# ~4 s of a 2-core CPU's ~45 s, and the speedrun's measure needs neither).
eval_interval = 280
eval_at_start = False
eval_train = False
eval_iters = 100  # 100 batches x 384 = 38,400 characters (a third of val); see BENCHMARKS.md for its error
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char"
# 12 sequences of 64 per step (small batches: per token, 12 x 64 learns faster here than 24 x 64 or 6 x 128),
# as 2 micro-batches of 6: one process per core on 2 cores (forge/cpulaunch.py), the same 12 windows as 1 x 12
gradient_accumulation_steps = 2
batch_size = 6
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # 280 steps see 0.22 M characters, a quarter of an epoch: nothing to regularise
bias = False
# The modern recipe. Rotary positions matter most here; QK-norm and the soft-cap let the high lrs work.
# rmsnorm stays off: LayerNorm has a fused CPU kernel, RMSNorm cost ~12% more per step for no gain here.
rotary = True
qk_norm = True
mlp = "relu2"
untied_head = True
zero_init_proj = True
logit_softcap = 30.0

optimizer = "muon"
muon_lr = 0.02  # 0.05 was clearly worse, 0.025 a little
learning_rate = 6e-3  # AdamW for the gains (6x the classic 1e-3; 1.2e-2 was no better)
embedding_lr = 0.05  # AdamW for the token embedding: 0.05 beat 6e-3, 0.02 and 0.1
head_lr = 0.002  # AdamW for the untied head
max_iters = 280  # val 1.870 / 1.861 / 1.847 at the end for seeds 1337 / 1 / 2 (270 steps, fp32 matmuls: 1.849-1.872)
lr_decay_iters = 280
min_lr = 6e-4
warmup_iters = 30
beta2 = 0.99

device = "cpu"
compile = False  # compiling costs more than this whole run
matmul_precision = "medium"  # bf16 matmul products on CPUs with AMX/AVX512-BF16: ~13% faster here, +0.006 loss
