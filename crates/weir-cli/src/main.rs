//! `weir`: the command-line entry point. Parses arguments, reads configuration once, wires the
//! library crates together and renders errors as one line.

mod cli;
mod cmd;
mod progress;
mod settings;

use clap::Parser;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, naming the problem; `--help` has the rest.
            let text = e.to_string();
            let msg: Vec<&str> =
                text.lines().map(str::trim).take_while(|l| !l.is_empty() && !l.starts_with("Usage:")).collect();
            let msg = msg.join(" ");
            eprintln!("weir: {} (see weir --help)", msg.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    init_tracing(cli.verbose);
    // Two rustls crypto providers are compiled in (ring and aws-lc-rs, from different
    // crates), so rustls cannot choose one on its own; every TLS use in this process gets ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Checkpoints scheduled by the command's commits finish before the process exits.
    let result = runtime.block_on(async {
        let result = cmd::run(cli).await;
        weir_lake::settle().await;
        result
    });
    if let Err(e) = result {
        eprintln!("weir: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, without repeating a cause already in the message.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        // deltalake logs "No files in log segment" at error level when a table does not
        // exist yet, which is the normal first step of creating one.
        // Lance's k-means warns about empty clusters on every PQ codebook of a small table
        // (under 64k rows); the index is still trained and its recall is measured.
        0 => "warn,deltalake_core=off,delta_kernel=off,buoyant_kernel=off,lance_index::vector::kmeans=error",
        1 => "info,weir=info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
