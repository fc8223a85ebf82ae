# GPT-2 (124M) on OpenWebText, 8 GPUs on one node: reaches ~2.85 val loss after 600k iterations.
# python data/openwebtext/prepare.py && torchrun --standalone --nproc_per_node=8 train.py config/owt.py

out_dir = "out-owt"
eval_interval = 1000
eval_iters = 200
log_interval = 10

wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
# 12 sequences x 1024 tokens x 40 micro-steps (5 per GPU on 8 GPUs) = 491,520 tokens per step (~0.5M)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# GPT-2 small
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000  # 600k x 0.5M = 300B tokens
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
