//! The paged KV cache's host side: the block pool and copy-on-write thread views.

pub mod block_pool;
pub mod view;

pub use block_pool::{BlockId, BlockPool};
pub use view::{BlockCopy, Chunk, KvView, SharedTail, Span};
