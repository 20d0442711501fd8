//! `fake-aws`: runs the offline AWS stand-in (`fake_aws::cli`) and prints what clients need
//! as `KEY=value` lines (also written to `--env-file`), then serves until SIGINT or SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAKE_AWS_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    fake_aws::cli::serve(fake_aws::cli::Cli::parse()).await
}
