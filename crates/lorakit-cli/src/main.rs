//! The `lorakit` binary: the program is `lorakit_cli::run`.
fn main() -> std::process::ExitCode {
    lorakit_cli::run()
}
