//! The `spindle` command line (part of the binary, not the library): one file per
//! subcommand.

pub mod demo;
pub mod gen_model;
pub mod inspect;
pub mod replay;
pub mod run;
