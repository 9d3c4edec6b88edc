//! Compiles the project's CUDA kernels (kernels/*.cu) to PTX when the `cuda` feature is on.
//!
//! Needs `nvcc` (from `$NVCC`, `$CUDA_HOME/bin` or `PATH`). The target is `sm_$CUDA_COMPUTE_CAP`
//! (default 80: the PTX then also runs on Hopper and later through the driver's JIT).
//! CPU builds skip all of this.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &[
    "paged_attention",
    "kv_cache",
    "sampling",
    "activation",
    "fused",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_start_matches("sm_").replace('.', ""))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".to_string());
    // Shared by the kernels through #include.
    println!("cargo:rerun-if-changed=kernels/dtype.cuh");
    for name in KERNELS {
        let src = Path::new("kernels").join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
