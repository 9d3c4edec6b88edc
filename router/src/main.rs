//! pd-router: parse the configuration and run the router until SIGINT/SIGTERM.

use clap::Parser;

/// Long-running nodes keep their allocations: glibc's malloc returned large freed blocks to the
/// kernel and faulted them in again every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config = pd_router::RouterConfig::parse();
    if let Err(e) = pd_router::main_with(config).await {
        eprintln!("pd-router: {e}");
        std::process::exit(1);
    }
}
