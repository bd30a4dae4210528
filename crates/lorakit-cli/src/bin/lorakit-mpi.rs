//! `lorakit` with MPI compiled in (the `mpi` feature), for `mpirun -np N lorakit-mpi train …`.
// Large buffers on cache lines: the AVX-512 kernels are faster on aligned rows.
#[global_allocator]
static ALLOCATOR: lorakit::engine::aligned_alloc::CacheLineAligned =
    lorakit::engine::aligned_alloc::CacheLineAligned;

fn main() -> std::process::ExitCode {
    lorakit_cli::run()
}
