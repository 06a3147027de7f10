//! The paged KV cache's host side: the block pool, copy-on-write thread views, and the
//! manager through which the engine changes them.

pub mod block_pool;
pub mod manager;
pub mod view;

pub use block_pool::{BlockId, BlockPool};
pub use manager::KvManager;
pub use view::{BlockCopy, Chunk, KvView, SharedTail, Span};
