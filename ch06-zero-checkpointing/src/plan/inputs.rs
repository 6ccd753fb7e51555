//! What the planner is asked about: a model, a batch, and the hardware.

use anyhow::{Context, bail};
use ch01_single_gpu::config::{ModelConfig, PRESETS};
use serde::Serialize;
use std::path::Path;

/// GPT-2's BPE vocabulary, for the GPT-2 presets.
const GPT2_VOCAB: usize = 50257;
/// Megatron-LM's padded GPT vocabulary (Narayanan et al. 2021, section 5).
const MEGATRON_VOCAB: usize = 51200;

/// Models beyond chapter 1's presets, all GPT-2 blocks: (name, layers, heads, hidden, sequence,
/// vocabulary). The `megatron-*` shapes are the five rows of Narayanan et al. 2021, Table 1; the
/// `Nb` ones are GPT-2 blocks at the widths of the usual 7B, 13B and 70B models.
pub const LARGE_PRESETS: [(&str, usize, usize, usize, usize, usize); 8] = [
    ("7b", 32, 32, 4096, 2048, GPT2_VOCAB),
    ("13b", 40, 40, 5120, 2048, GPT2_VOCAB),
    ("70b", 80, 64, 8192, 2048, GPT2_VOCAB),
    ("megatron-1.7b", 24, 24, 2304, 2048, MEGATRON_VOCAB),
    ("megatron-7.5b", 36, 32, 4096, 2048, MEGATRON_VOCAB),
    ("megatron-39b", 48, 64, 8192, 2048, MEGATRON_VOCAB),
    ("megatron-146b", 80, 96, 12288, 2048, MEGATRON_VOCAB),
    ("megatron-530b", 105, 128, 20480, 2048, MEGATRON_VOCAB),
];

/// The model by name: chapter 1's presets (GPT-2's vocabulary) or [`LARGE_PRESETS`].
pub fn preset(name: &str) -> anyhow::Result<ModelConfig> {
    if let Some(&(_, n_layer, n_head, n_embd, block_size, vocab_size)) = LARGE_PRESETS.iter().find(|p| p.0 == name) {
        return Ok(ModelConfig { n_layer, n_head, n_embd, block_size, vocab_size });
    }
    ModelConfig::preset(name, GPT2_VOCAB).map_err(|_| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.0).chain(LARGE_PRESETS.iter().map(|p| p.0)).collect();
        anyhow::anyhow!("unknown model '{name}' (expected one of: {})", names.join(", "))
    })
}

/// A Hugging Face `config.json`: GPT-2's keys (`n_layer`, `n_head`, `n_embd`, `n_positions`) or
/// the Llama family's (`num_hidden_layers`, `num_attention_heads`, `hidden_size`,
/// `max_position_embeddings`), and `vocab_size`. The planner prices GPT-2 blocks of that shape.
pub fn from_hf_config(path: &Path) -> anyhow::Result<ModelConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let get = |keys: &[&str]| -> anyhow::Result<usize> {
        keys.iter()
            .find_map(|k| json.get(*k).and_then(serde_json::Value::as_u64))
            .map(|v| v as usize)
            .with_context(|| format!("{} has no {}", path.display(), keys.join(" or ")))
    };
    Ok(ModelConfig {
        n_layer: get(&["n_layer", "num_hidden_layers"])?,
        n_head: get(&["n_head", "num_attention_heads"])?,
        n_embd: get(&["n_embd", "hidden_size"])?,
        block_size: get(&["n_positions", "max_position_embeddings", "n_ctx"])?,
        vocab_size: get(&["vocab_size"])?,
    })
}

// ANCHOR: gpus
/// One accelerator and the machine around it. Bandwidths are bytes a second one way, per GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    /// Dense bf16 tensor-core FLOP/s (no sparsity).
    pub peak_flops: f64,
    pub memory_bytes: f64,
    /// HBM bandwidth: what the memory-bound ops (LayerNorm, GELU, softmax, residual adds) wait on.
    pub memory_bandwidth: f64,
    /// NVLink, one direction: what one GPU sends to the others in its node.
    pub nvlink_bandwidth: f64,
    /// The network between nodes: each GPU's own NIC.
    pub network_bandwidth: f64,
    pub gpus_per_node: usize,
}

const GB: f64 = 1e9;
const TFLOPS: f64 = 1e12;

/// The built-in machines, from the vendors' specification sheets:
/// - A100 SXM (NVIDIA A100 Tensor Core GPU datasheet, 2021): 312 TFLOP/s bf16 dense, 40 GB at
///   1,555 GB/s or 80 GB at 2,039 GB/s, NVLink 3 at 600 GB/s both ways (300 one way); in a DGX A100, 8 GPUs and 8 ConnectX-6 HDR
///   InfiniBand NICs of 200 Gb/s (25 GB/s per GPU).
/// - H100 SXM (NVIDIA H100 datasheet, 2023): 989 TFLOP/s bf16 dense, 80 GB at 3.35 TB/s, NVLink 4 at 900 GB/s
///   both ways (450 one way); in a DGX H100, 8 GPUs and 8 ConnectX-7 NICs of 400 Gb/s (50 GB/s).
/// - H200 SXM (NVIDIA H200 datasheet, 2024): the H100's compute and links, 141 GB at 4.8 TB/s.
pub fn gpu(name: &str) -> anyhow::Result<Gpu> {
    let (peak, memory, hbm, nvlink, network) = match name {
        "a100-40gb" => (312.0, 40.0, 1555.0, 300.0, 25.0),
        "a100-80gb" => (312.0, 80.0, 2039.0, 300.0, 25.0),
        "h100-80gb" => (989.0, 80.0, 3350.0, 450.0, 50.0),
        "h200" => (989.0, 141.0, 4800.0, 450.0, 50.0),
        _ => bail!("unknown GPU '{name}' (expected one of: a100-40gb, a100-80gb, h100-80gb, h200)"),
    };
    Ok(Gpu {
        name: name.into(),
        peak_flops: peak * TFLOPS,
        memory_bytes: memory * GB,
        memory_bandwidth: hbm * GB,
        nvlink_bandwidth: nvlink * GB,
        network_bandwidth: network * GB,
        gpus_per_node: 8,
    })
}

/// The assumptions that are not on a specification sheet, stated once. The same values serve
/// every model and machine (the Megatron test holds them to five published runs, none fitted to
/// one row).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Assumptions {
    /// The share of peak FLOP/s that the matmuls reach: what large bf16 GEMMs reach on A100s and
    /// H100s in practice.
    pub efficiency: f64,
    /// Latency of one step of a collective (one message) inside a node and across nodes, seconds.
    pub nvlink_latency: f64,
    pub network_latency: f64,
    /// Whether the data-parallel gradient sync runs under backward (chapter 2's buckets), or
    /// after it (Megatron-LM in 2021).
    pub overlap_data_parallel: bool,
}

impl Assumptions {
    /// This book's trainers.
    pub const DEFAULT: Assumptions =
        Assumptions { efficiency: 0.6, nvlink_latency: 5e-6, network_latency: 10e-6, overlap_data_parallel: true };
    /// Megatron-LM as Narayanan et al. 2021 ran it: the same, but the gradients all-reduced after
    /// the backward pass.
    pub const MEGATRON_2021: Assumptions = Assumptions { overlap_data_parallel: false, ..Assumptions::DEFAULT };
}
// ANCHOR_END: gpus

/// `--gpus N` or `--gpus A..B`: the GPU counts to plan for. A range holds the counts in it that
/// are powers of two or whole nodes.
pub fn gpu_counts(text: &str, gpus_per_node: usize) -> anyhow::Result<Vec<usize>> {
    let number = |s: &str| -> anyhow::Result<usize> {
        match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--gpus: '{text}' is not a positive number or a range A..B"),
        }
    };
    match text.split_once("..") {
        None => Ok(vec![number(text)?]),
        Some((a, b)) => {
            let (a, b) = (number(a)?, number(b.trim_start_matches('='))?);
            if a > b {
                bail!("--gpus: the range {text} is empty");
            }
            Ok((a..=b)
                .filter(|n| n.is_power_of_two() || n.is_multiple_of(gpus_per_node) || *n == a || *n == b)
                .collect())
        }
    }
}

/// `--layout dp,tp,pp`.
pub fn parse_layout(text: &str) -> anyhow::Result<(usize, usize, usize)> {
    let parts: Vec<Option<usize>> = text.split(',').map(|s| s.trim().parse().ok().filter(|&n| n > 0)).collect();
    match parts.as_slice() {
        [Some(dp), Some(tp), Some(pp)] => Ok((*dp, *tp, *pp)),
        _ => bail!("--layout: '{text}' is not three positive numbers dp,tp,pp"),
    }
}
