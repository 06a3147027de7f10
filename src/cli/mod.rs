//! The `spindle` command line: one file per subcommand.

pub mod demo;
pub mod device;
pub mod gen_model;
pub mod inspect;
pub mod replay;
pub mod run;
