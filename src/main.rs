//! The `spindle` command: inspect and generate checkpoints, replay thread trees, run the
//! adaptive engine on a prompt, and the built-in demo (the default).

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "spindle",
    version,
    about = "A runtime for adaptive parallel reasoning"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a checkpoint (architecture, parameters, dtypes, tensors) or say why it is bad.
    Inspect(cli::inspect::InspectArgs),
    /// Write a random-weight checkpoint at real model shapes.
    GenModel(cli::gen_model::GenModelArgs),
    /// Teacher-force a thread tree through the engine and write its logits and stats.
    Replay(cli::replay::ReplayArgs),
    /// Generate from a prompt; the model's own control tags fork and join threads.
    Run(cli::run::RunArgs),
    /// The built-in demo (tiny model, scripted workload); the default command.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Inspect(a)) => cli::inspect::run(a),
        Some(Command::GenModel(a)) => cli::gen_model::run(a),
        Some(Command::Replay(a)) => cli::replay::run(a),
        Some(Command::Run(a)) => cli::run::run(a),
        Some(Command::Demo(a)) => cli::demo::run(a),
        None => cli::demo::run(&cli::demo::DemoArgs::default()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
