//! Command line: parse arguments, load configuration, start, wait for a signal, drain.

mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;

use allocator::Mimalloc;
use clap::{Parser, Subcommand};
use nvidia_sidecar::config::{self, Config, ProcessEnv, Settings};
use nvidia_sidecar::{app::App, demo, logging, mock, sidecar};

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

#[derive(Parser)]
#[command(
    name = "nvidia-sidecar",
    version,
    about = "Rate-limiting sidecar proxy that paces traffic to OpenAI-compatible LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (providers, routes, settings).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Run the simulated OpenAI-compatible upstream.
    MockUpstream(mock::MockConfig),
    /// Simulated upstream + sidecar + synthetic client; needs no key and no network.
    Demo(demo::DemoArgs),
    /// Print every setting (variable, flag, default, meaning) as a Markdown table.
    Settings,
}

/// `SIDECAR_*` variables set, each with where: the environment or `.env`.
type Variables = Vec<(String, &'static str)>;

/// The configuration as the file, environment and flags say now, and the `SIDECAR_*`
/// variables set (to warn about those no setting reads once logging runs).
fn load(cli: &Cli) -> Result<(Config, Variables), config::ConfigError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let env = ProcessEnv::with_dotenv(&cwd)?;
    let config = config::load(cli.config.as_deref(), &env, cli.settings.clone())?;
    Ok((config, env.sidecar_names()))
}

/// One warning per `SIDECAR_*` variable that no setting reads, naming the closest one.
fn warn_unknown_variables(names: &[(String, &'static str)]) {
    for (name, from) in names {
        if let Some((name, closest)) = config::unknown_variable(name) {
            match closest {
                Some(c) => {
                    tracing::warn!(variable = %name, set_in = from, did_you_mean = c, "unknown variable, ignored")
                }
                None => {
                    tracing::warn!(variable = %name, set_in = from, "unknown variable, ignored (`nvidia-sidecar settings` lists them all)")
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if matches!(cli.command, Some(Command::Settings)) {
        print!("{}", config::markdown_table());
        return ExitCode::SUCCESS;
    }
    let (config, variables) = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nvidia-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    // The guard is held to the end of main: dropping it flushes the log.
    let (level_handle, _log_guard) = match logging::init(config.log_level, config.log_format) {
        Ok((handle, guard)) => (Some(handle), Some(guard)),
        Err(e) => {
            eprintln!("nvidia-sidecar: cannot start logging: {e}");
            (None, None)
        }
    };
    warn_unknown_variables(&variables);
    for (flag, instead) in config::secret_flags(&cli.settings) {
        tracing::warn!(
            flag,
            instead,
            "a secret given as a command-line flag is visible to other users of this machine (ps, /proc); use a file or the environment instead"
        );
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("nvidia-sidecar: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    match cli.command.take().unwrap_or(Command::Run) {
        Command::Run => {
            let app = App::new(config);
            if let Some(h) = level_handle {
                let _ = app.log_level.set(h);
            }
            match sidecar::run(app, &rt, || load(&cli).map(|(c, _)| c)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nvidia-sidecar: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::MockUpstream(mc) => {
            let server = match mock::MockServer::start(mc) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("nvidia-sidecar: cannot start the simulated upstream: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(base_url = %server.base_url(), "simulated upstream listening");
            println!("simulated upstream listening on {}", server.base_url());
            rt.block_on(sidecar::signal());
            server.stop();
            ExitCode::SUCCESS
        }
        Command::Settings => ExitCode::SUCCESS,
        Command::Demo(args) => {
            let local = tokio::task::LocalSet::new();
            match local.block_on(&rt, demo::run(config, args, sidecar::signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nvidia-sidecar: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
