"""Peak FLOP/s of GPUs, for MFU (model FLOPs utilisation): a table of datasheet figures and the
matching of torch.cuda.get_device_name() strings to it.

    peak = device_peak_flops("cuda", torch.bfloat16)  # None on a CPU or an unlisted GPU
    mfu = model.estimate_mfu(tokens_per_iter, dt, peak)

train.py and bench.py call it (--peak_flops overrides it, e.g. for a CPU or a GPU not listed).
"""
import re

import torch

# Dense (no sparsity) 16-bit tensor-core peaks, bf16 where the GPU has it, else fp16, with fp32
# accumulation. Datasheets quote "with sparsity" figures at twice these.
PEAK_FLOPS = {
    # NVIDIA A100 datasheet (SXM and PCIe, 40 and 80 GB): BF16 Tensor Core 312 TFLOPS | 624 sparse
    "A100": 312e12,
    # NVIDIA H100 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with sparsity
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    # NVIDIA H200 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity
    "H200": 989e12,
    "H200 NVL": 835e12,
    # NVIDIA GH200 Grace Hopper datasheet: BF16 1,979 TFLOPS with sparsity (an H100/H200-class GPU)
    "GH200": 989e12,
    # NVIDIA HGX B200 datasheet: per GPU FP16/BF16 Tensor Core 4.5 PFLOPS with sparsity
    "B200": 2250e12,
    # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    "L4": 121e12,
    # NVIDIA L40S datasheet: BF16 Tensor Core 362.05 | 733 sparse; L40 datasheet: 181.05 | 362.1 sparse
    "L40S": 362e12,
    "L40": 181e12,
    # NVIDIA A40 datasheet: BF16 Tensor Core with FP32 accumulate 149.7 | 299.4 sparse
    "A40": 150e12,
    # NVIDIA A10 datasheet: BF16 Tensor Core 125 | 250 sparse
    "A10": 125e12,
    # AWS's A10G (EC2 G5) has no public NVIDIA datasheet; 70 TFLOPS BF16 tensor as AWS lists it
    # (compared with the A10 in Baseten's "NVIDIA A10 vs A10G for ML model inference")
    "A10G": 70e12,
    # NVIDIA Ada Lovelace architecture whitepaper, appendix: RTX 4090 FP16/BF16 Tensor with FP32 accumulate 165.2
    "RTX 4090": 165e12,
    # NVIDIA Ampere GA102 architecture whitepaper, appendix A: RTX 3090 FP16/BF16 Tensor with FP32 accumulate 71
    "RTX 3090": 71e12,
    # NVIDIA V100 datasheet: Tensor Performance (fp16) 125 (SXM2) / 112 (PCIe) TFLOPS
    "V100": 125e12,
    "V100 PCIe": 112e12,
    # NVIDIA T4 datasheet: Mixed Precision (FP16/FP32) 65 TFLOPS
    "T4": 65e12,
    # AMD Instinct MI300X / MI325X datasheets: Peak BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity)
    "MI300X": 1307e12,
    "MI325X": 1307e12,
}

# torch.cuda.get_device_name() spellings, matched on the lowercased name with punctuation turned
# into spaces ("NVIDIA H100 80GB HBM3" -> "nvidia h100 80gb hbm3"); the most specific come first.
_GPU_NAME_PATTERNS = [
    (r"\bgh200\b", "GH200"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),  # "H100 80GB HBM3", "H100 SXM5 80GB"
    (r"\bb200\b", "B200"),
    (r"\ba100\b", "A100"),
    (r"\bl40s\b", "L40S"),
    (r"\bl40\b", "L40"),
    (r"\bl4\b", "L4"),
    (r"\ba40\b", "A40"),
    (r"\ba10g\b", "A10G"),
    (r"\ba10\b", "A10"),
    (r"\brtx 4090\b(?! d\b)", "RTX 4090"),  # not the slower 4090 D
    (r"\brtx 3090\b(?! ti\b)", "RTX 3090"),  # not the faster 3090 Ti
    (r"\bv100\b.*\bpcie\b", "V100 PCIe"),
    (r"\bv100\b", "V100"),
    (r"\bt4\b", "T4"),
    (r"\bmi300x\b", "MI300X"),
    (r"\bmi325x\b", "MI325X"),
]


def peak_flops_for_gpu_name(name):
    """The PEAK_FLOPS entry for a torch.cuda.get_device_name() string, or None if unlisted."""
    normalized = " ".join(re.findall(r"[a-z0-9]+", name.lower()))
    for pattern, key in _GPU_NAME_PATTERNS:
        if re.search(pattern, normalized):
            return PEAK_FLOPS[key]
    return None


def device_peak_flops(device, dtype=torch.bfloat16):
    """Peak dense FLOP/s of a device for 16-bit (bf16/fp16) matmuls; None when unknown.

    None for a CPU (its peak depends on cores, clocks and vector units: pass peak_flops to
    estimate_mfu instead), for an unlisted GPU, and for other dtypes (the table holds 16-bit
    tensor-core peaks only).
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        return None
    return peak_flops_for_gpu_name(torch.cuda.get_device_name(device))
