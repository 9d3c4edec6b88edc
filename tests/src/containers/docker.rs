//! Running the `docker` and compose command-line tools: each call bounded in time, its failure
//! an error that quotes the command and what it printed.

use std::ffi::OsStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

/// Longest one docker command may take (a `stop` waits for the drain inside it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether a Docker engine answers here; `Err` says why not.
pub async fn engine_available() -> Result<()> {
    docker(["info", "--format", "{{.ServerVersion}}"])
        .await
        .map(drop)
}

/// `docker ARGS...`; stdout, trimmed.
pub async fn docker<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new("docker");
    command.args(args);
    run(command).await
}

/// How this machine runs Compose: Compose v2 (`docker compose`) or docker-compose 1.x.
#[derive(Debug, Clone)]
pub enum ComposeTool {
    Plugin,
    Standalone,
}

impl ComposeTool {
    /// `PD_COMPOSE=docker-compose` or `PD_COMPOSE="docker compose"` chooses; else whichever answers.
    pub async fn detect() -> Result<ComposeTool> {
        match std::env::var("PD_COMPOSE").ok().as_deref() {
            Some("docker compose") => return Ok(ComposeTool::Plugin),
            Some("docker-compose") => return Ok(ComposeTool::Standalone),
            _ => {}
        }
        if docker(["compose", "version"]).await.is_ok() {
            return Ok(ComposeTool::Plugin);
        }
        let mut standalone = Command::new("docker-compose");
        standalone.arg("version");
        run(standalone)
            .await
            .context("neither `docker compose` nor `docker-compose` runs")?;
        Ok(ComposeTool::Standalone)
    }

    pub fn command(&self) -> Command {
        match self {
            ComposeTool::Plugin => {
                let mut c = Command::new("docker");
                c.arg("compose");
                c
            }
            ComposeTool::Standalone => Command::new("docker-compose"),
        }
    }
}

/// Runs `command` to its end within [`COMMAND_TIMEOUT`]; stdout when it succeeds.
pub async fn run(mut command: Command) -> Result<String> {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let shown = format!("{:?}", command.as_std());
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .with_context(|| format!("{shown} ran past {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("starting {shown}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            if stdout.is_empty() {
                String::new()
            } else {
                format!("\n{stdout}")
            }
        );
    }
    Ok(stdout)
}
