# The bigram baseline on Tiny Shakespeare characters: a lookup table of next-character logits
# (about 2.5 val loss). Any real model must beat it. Runs in seconds on a CPU.
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_bigram.py

out_dir = "out-shakespeare-bigram"
model_type = "bigram"
eval_interval = 500
eval_iters = 50
log_interval = 100

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32
block_size = 8

learning_rate = 1e-2
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-3
warmup_iters = 100
weight_decay = 0.0

device = "cpu"
compile = False
