# Fine-tune GPT-2 XL (1.5B) with LoRA on your prompt/response pairs: fits one 16 GB GPU in bf16 with
# activation checkpointing (docs/BENCHMARKS.md works it out); full fine-tuning would need 40 GB+.
# python data/text/prepare.py pairs.jsonl --format prompt_response --out_dir data/pairs
# python train.py config/finetune_lora.py
# python sample.py --out_dir=out-lora --start="<a prompt in your template>"; python -m forge.export out-lora gpt2-xl-lora

out_dir = "out-lora"
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # only save when val loss improves: small sets overfit fast

wandb_log = False
wandb_project = "lora"
wandb_run_name = "lora-gpt2-xl"

dataset = "pairs"  # data/pairs, written by the prepare command above: loss on the responses only
init_from = "gpt2-xl"  # or gpt2 / gpt2-medium / gpt2-large, a local Hugging Face folder, another run's out_dir

finetune = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "c_attn,c_proj,c_fc"

# one example per window (padded): set block_size just above your longest prompt + response
block_size = 512
batch_size = 8
gradient_accumulation_steps = 4
activation_checkpointing = True

max_iters = 600
learning_rate = 2e-4  # adapters start at zero and take a larger lr than full fine-tuning
warmup_iters = 30
lr_decay_iters = 600
min_lr = 2e-5
weight_decay = 0.0
dropout = 0.0
