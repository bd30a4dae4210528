//! Data-parallel training across processes: what the training loop needs of the ranks of a
//! run ([`Collective`]) and one process ([`SingleProcess`]). MPI's ranks (started by `mpirun`)
//! are the `lorakit-mpi` crate's `MpiWorld`, which the CLI's `mpi` feature compiles in.
//!
//! Why a gather and not MPI_Allreduce: the sum MPI_Allreduce computes has an order the MPI
//! library chooses (and which changes with the rank count), so the result would depend on how
//! many ranks ran. Every rank instead receives each micro-batch's gradient and adds them in the
//! micro-batches' global order, the order a single process adds them in; a run therefore gives
//! the same bytes on 1, 2 or N ranks, and a checkpoint resumes exactly on any rank count. LoRA's
//! gradients are small (1.8 MB per micro-batch for SmolLM2, r = 8 on q, v), so gathering them
//! costs little beside a step of compute.

use crate::error::{Error, Result};

/// The ranks of one training run.
pub trait Collective {
    /// This process's rank, 0 ..= size − 1; rank 0 writes every output.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` (the same length on every rank), concatenated in rank order.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// [`Collective::all_gather_f32`] for f64 values (losses, token counts).
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// [`Collective::all_gather_f32`] for u64 values (hashes, flags).
    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<u64>>;
}

/// A run of one process.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<u64>> {
        Ok(local.to_vec())
    }
}

/// Checks that every rank computed the same `hash` of `what` (the model, the data, the
/// options); rank 0's is the reference. `ok` is this rank's own readiness: a rank that failed
/// before training (rank 0 refusing the output directory, say) takes part with `ok = false`, so
/// that the others stop with a message instead of waiting for it forever.
pub fn check_agreement(comm: &dyn Collective, hash: u64, ok: bool, what: &str) -> Result<()> {
    let all = comm.all_gather_u64(&[hash, ok as u64])?;
    let failed: Vec<usize> = (0..comm.size()).filter(|&r| all[2 * r + 1] == 0).collect();
    if !failed.is_empty() {
        return Err(Error::Invalid(format!(
            "rank {}: stopping because rank(s) {failed:?} failed before training (see their error)",
            comm.rank()
        )));
    }
    let differ: Vec<usize> = (0..comm.size()).filter(|&r| all[2 * r] != all[0]).collect();
    if !differ.is_empty() {
        return Err(Error::Invalid(format!(
            "rank(s) {differ:?} disagree with rank 0 on {what} (a different file or options on that machine?)"
        )));
    }
    Ok(())
}

/// FNV-1a over bytes: the agreement hash (not cryptographic: it guards against mistakes).
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The FNV-1a offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
