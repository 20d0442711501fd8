//! How xtask shows long waits: a spinner on a terminal, plain lines elsewhere (CI logs).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pgharness::events::Event;

/// A progress display fed by pgharness events.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn start(message: &str) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar.set_message(message.to_owned());
            Progress { bar: Some(bar) }
        } else {
            eprintln!("xtask: {message}");
            Progress { bar: None }
        }
    }

    pub(crate) fn say(&self, message: String) {
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None => eprintln!("xtask: {message}"),
        }
    }

    pub(crate) fn event(&self, event: Event) {
        let message = match event {
            Event::Probing { backend } => format!("checking the {backend} backend"),
            Event::CreatingContainer { name, image } => {
                format!("starting container {name} from {image}")
            }
            Event::JoinedContainer { name } => format!("using running container {name}"),
            Event::InitialisingCluster { data_dir } => format!("initdb {data_dir}"),
            Event::StartingServer { listen } => format!("starting postgres on {listen}"),
            Event::WaitingForServer { reason, waited } => {
                format!("waiting for the server ({}s): {reason}", waited.as_secs())
            }
            Event::ServerReady { after } => {
                format!("server ready after {:.1}s", after.as_secs_f64())
            }
            Event::OpeningTunnel { target, host, port } => {
                format!("opening the SSM tunnel through {target} to {host}:{port}")
            }
            Event::TunnelOpen { session } => format!("SSM session {session} open"),
            Event::EndedStaleSession { session, pid } => format!(
                "terminated SSM session {session} of a proxy that died (pid {pid}), with its database sessions"
            ),
            Event::LoggingIn { host, user } => format!("logging in to {host} as {user} (IAM)"),
            Event::WaitingForDatabase { waited, reason } => format!(
                "waiting for the database to resume… {}s ({reason})",
                waited.as_secs()
            ),
            other => format!("{other:?}"),
        };
        self.say(message);
    }

    pub(crate) fn finish(self, message: &str) {
        match self.bar {
            Some(bar) => bar.finish_with_message(message.to_owned()),
            None => eprintln!("xtask: {message}"),
        }
    }
}
