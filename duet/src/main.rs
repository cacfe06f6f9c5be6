//! `duet`: the daemon and the CLI in one binary. The binary is thin: it parses arguments, loads
//! the configuration, and calls into the library's `daemon` or the control socket.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error; 3 the daemon is not
//! reachable.

use duet::{config, control, daemon, plan, status};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// duet: two machines, one replicated block device, automatic failover.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (one file, identical on both nodes).
    #[arg(long, global = true, default_value = "/etc/duet/duet.toml")]
    config: PathBuf,
    /// This node's name (a [node.NAME] section); default: the hostname.
    #[arg(long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run this node.
    Daemon,
    /// Roles, disk and connection states, NBD clients and counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print what each node will do.
    CheckConfig,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Cmd::CheckConfig = cli.cmd {
        print!("{}", plan::describe(&cfg));
        return ExitCode::SUCCESS;
    }
    let node = match cfg.pick_node(cli.node.as_deref(), &hostname()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("duet: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duet: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match cli.cmd {
        Cmd::CheckConfig => unreachable!("handled above"),
        Cmd::Daemon => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("DUET_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            match rt.block_on(daemon::run(cfg, node)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("duet: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Cmd::Status { json } => {
            let sock = cfg.control_socket(&node);
            match rt.block_on(daemon::call(&sock, control::Command::Status)) {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        return ExitCode::SUCCESS;
                    }
                    match serde_json::from_value::<status::NodeStatus>(v) {
                        Ok(s) => {
                            print!("{}", status::render(&s));
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("duet: unexpected status from the daemon: {e}");
                            ExitCode::from(EXIT_RUNTIME)
                        }
                    }
                }
                Err(e @ daemon::CallError::Unreachable(..)) => {
                    eprintln!("duet: {e}");
                    ExitCode::from(EXIT_UNREACHABLE)
                }
                Err(e) => {
                    eprintln!("duet: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}
