//! `lorakit` with MPI compiled in (the `mpi` feature), for `mpirun -np N lorakit-mpi train …`.
fn main() -> std::process::ExitCode {
    lorakit_cli::run()
}
