//! MPI through the `mpi` crate (the system's OpenMPI or MPICH): the ranks of an `mpirun` job
//! as a [`Collective`] for lorakit's data-parallel training (`lorakit::train::parallel`, where
//! the gather-not-reduce design is explained). A rank that dies makes the MPI runtime stop the
//! whole job (OpenMPI's default error handler), so no rank waits for it forever.

use lorakit::train::parallel::Collective;
use lorakit::Result;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

pub struct MpiWorld {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
}

impl MpiWorld {
    /// Initialises MPI; `None` when it was initialised already.
    pub fn init() -> Option<MpiWorld> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some(MpiWorld {
            _universe: universe,
            world,
        })
    }

    /// Every rank's `local` (the same length on every rank), concatenated in rank order.
    fn gather<T: Equivalence + Default + Clone>(&self, local: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); local.len() * self.size()];
        self.world.all_gather_into(local, &mut out[..]);
        out
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(self.gather(local))
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(self.gather(local))
    }
    fn all_gather_u64(&self, local: &[u64]) -> Result<Vec<u64>> {
        Ok(self.gather(local))
    }
}
