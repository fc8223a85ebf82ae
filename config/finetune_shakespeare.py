# Fine-tune GPT-2 on Tiny Shakespeare (GPT-2 BPE) on one GPU; gpt2-xl needs ~40 GB, use gpt2 or
# gpt2-medium on smaller cards (or parallelism="fsdp" across several).
# python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # only save when val loss improves: fine-tuning overfits fast

wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2 (1.5B parameters)

# 1 x 32 x 1024 = 32,768 tokens per iteration; Tiny Shakespeare is ~300k tokens: 1 epoch ~ 9 iterations
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a small constant learning rate
learning_rate = 3e-5
decay_lr = False
dropout = 0.1
