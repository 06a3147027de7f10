//! `Checkpoint::release_pages`: a released tensor still reads back the same bytes, and
//! releasing an unknown name or every tensor twice is harmless.

mod common;

use common::fixtures;
use model_loader::Checkpoint;

#[test]
fn released_tensors_read_back_unchanged() {
    let ck = Checkpoint::open(&fixtures().join("tiny-llama")).expect("fixture opens");
    let before: Vec<(String, Vec<u8>)> = ck
        .tensors()
        .iter()
        .map(|t| (t.name.to_string(), t.data.to_vec()))
        .collect();
    assert!(!before.is_empty());
    for _ in 0..2 {
        for (name, _) in &before {
            ck.release_pages(name);
        }
    }
    ck.release_pages("no.such.tensor");
    for (name, bytes) in &before {
        assert_eq!(
            ck.tensor(name).expect("still there").data,
            &bytes[..],
            "{name}"
        );
    }
}
