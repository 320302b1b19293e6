//! Writing GGUF v3 files (llama.cpp's format, as gguf-py's `GGUFWriter` lays it out): the
//! header, metadata in the order given, tensor infos, then each tensor's data at a 32-byte
//! aligned offset. Tensors are encoded one at a time as the file is written, so a model is
//! never held twice; the file goes to a temp name and is renamed into place.

use crate::error::ModelError;
use std::io::{BufWriter, Write};
use std::path::Path;

/// `general.alignment`'s default: tensor data offsets are multiples of it.
pub const ALIGNMENT: usize = 32;

/// A metadata value, by GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    Strs(Vec<String>),
}

/// A tensor to write: its GGUF name, HF-order shape (rows first), ggml type and byte count.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    pub bytes: usize,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    let array = |w: &mut dyn Write, ty: u32, n: usize| -> std::io::Result<()> {
        w.write_all(&9u32.to_le_bytes())?;
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(&(n as u64).to_le_bytes())
    };
    match v {
        MetaValue::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        MetaValue::I32(x) => {
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        MetaValue::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        MetaValue::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        MetaValue::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            put_str(w, s)
        }
        MetaValue::I32s(v) => {
            array(w, 5, v.len())?;
            v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        MetaValue::F32s(v) => {
            array(w, 6, v.len())?;
            v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        MetaValue::Strs(v) => {
            array(w, 8, v.len())?;
            v.iter().try_for_each(|s| put_str(w, s))
        }
    }
}

fn pad(w: &mut impl Write, at: usize) -> std::io::Result<usize> {
    let n = at.next_multiple_of(ALIGNMENT) - at;
    w.write_all(&[0u8; ALIGNMENT][..n])?;
    Ok(at + n)
}

/// Counts bytes passed through, for alignment.
struct Counting<W> {
    inner: W,
    n: usize,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The file into `w`; `data(i)` gives tensor i's bytes (exactly `tensors[i].bytes` of them).
pub fn write_to<W: Write>(
    w: W,
    meta: &[(String, MetaValue)],
    tensors: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, ModelError>,
    what: &str,
) -> Result<W, ModelError> {
    let io = |e: std::io::Error| ModelError::io(what, format!("cannot write: {e}"));
    let mut w = Counting { inner: w, n: 0 };
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(meta.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (k, v) in meta {
        put_str(&mut w, k).map_err(io)?;
        put_value(&mut w, v).map_err(io)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut w, &t.name).map_err(io)?;
        w.write_all(&(t.shape.len() as u32).to_le_bytes())
            .map_err(io)?;
        // ggml order: the contiguous dimension first.
        for d in t.shape.iter().rev() {
            w.write_all(&(*d as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&t.ggml_type.to_le_bytes()).map_err(io)?;
        w.write_all(&(offset as u64).to_le_bytes()).map_err(io)?;
        offset = (offset + t.bytes).next_multiple_of(ALIGNMENT);
    }
    let at = w.n;
    pad(&mut w, at).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != t.bytes {
            return Err(ModelError::tensor(
                what,
                &t.name,
                format!("{} bytes encoded, {} planned", bytes.len(), t.bytes),
            ));
        }
        w.write_all(&bytes).map_err(io)?;
        // Every tensor padded, the last one too, as gguf-py writes it.
        let at = w.n;
        pad(&mut w, at).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(w.inner)
}

/// The file at `path`, through a temp file in its folder renamed into place.
pub fn write_file(
    path: &Path,
    meta: &[(String, MetaValue)],
    tensors: &[TensorPlan],
    data: impl FnMut(usize) -> Result<Vec<u8>, ModelError>,
) -> Result<(), ModelError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let file = std::fs::File::create(&tmp)
        .map_err(|e| ModelError::io(tmp.display(), format!("cannot create: {e}")))?;
    let what = path.display().to_string();
    let written = write_to(BufWriter::new(file), meta, tensors, data, &what)
        .and_then(|w| {
            w.into_inner()
                .map_err(|e| ModelError::io(&what, format!("cannot write: {e}")))
        })
        .and_then(|f| {
            f.sync_all()
                .map_err(|e| ModelError::io(&what, format!("cannot write: {e}")))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| ModelError::io(path.display(), format!("cannot rename into place: {e}")))
}
