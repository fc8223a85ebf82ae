# GPT-2 small (124M) the modern way: the recipe behind the public speed records (modded-nanogpt) with
# this repo's options (rotary, RMSNorm, QK-norm, ReLU^2, untied head, zero-init projections,
# logit soft-cap) and Muon.
# Aim: GPT-2 quality (FineWeb val loss 3.28, llm.c's GPT-2 after 10 B tokens) in ~2.5 B tokens instead of
# the classic recipe's 300 B (config/owt.py). NOT MEASURED here (no GPU); see docs/SPEEDRUN.md.
#   FineWeb:     python data/fineweb/prepare.py --dataset fineweb   (streams sample-10BT -> data/fineweb-sample-10BT)
#   8 GPUs:      torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_speedrun.py
#   OpenWebText: add --dataset=openwebtext (the bar there: OpenAI's GPT-2 124M scores ~3.12, evaluate.py)

out_dir = "out-gpt2-124m-speedrun"
eval_interval = 250  # watch the val curve for the step that crosses the target
eval_iters = 20  # 20 x 64 x 1024 x 8 ranks ~ 10.5 M tokens per split, the records' val budget
log_interval = 10

wandb_log = False
wandb_project = "gpt2-speedrun"
wandb_run_name = "gpt2-124m-muon"

dataset = "fineweb-sample-10BT"  # data/fineweb/prepare.py --dataset fineweb writes it (val: its first 20,000 documents)
# 64 sequences x 1024 tokens x 8 micro-steps (1 per GPU on 8 GPUs) = 524,288 tokens per step
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8

n_layer = 12
n_head = 6  # head size 128, as the records use
n_embd = 768
dropout = 0.0
bias = False
rotary = True
rmsnorm = True
qk_norm = True
mlp = "relu2"
untied_head = True
zero_init_proj = True
logit_softcap = 30.0

optimizer = "muon"
muon_lr = 0.05  # the hidden matrices
muon_momentum = 0.95
muon_weight_decay = 0.0
embedding_lr = 0.6  # the token embedding: Adam steps of this size are fine for rows seen a few times per step
head_lr = 0.008  # the untied head (zero-initialised)
learning_rate = 0.04  # the RMSNorm gains (and the reference lr of the schedule)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0  # Muon's update does not depend on the gradient's scale; the records do not clip
max_iters = 5000  # 2.6 B tokens; the Oct-2024 record reached 3.28 in 5,100 steps with less of this recipe
lr_decay_iters = 5000
warmup_iters = 0  # Muon needs no warmup; the lr decays from the first step (cosine, to min_lr)
min_lr = 0.0

dtype = "bfloat16"
compile = True
