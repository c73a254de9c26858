//! A serde `Deserializer` over parsed terms, so ErlMail's keys are applied by the same
//! code as YAML's (`config/apply.rs`); errors remember the term they were raised in.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};

use super::{pair, Pos, Term, TermKind};

/// A serde error that remembers the first (innermost) term it was raised in.
#[derive(Debug)]
pub struct DeError {
    /// Position of the term the error belongs to, once known.
    pub pos: Option<Pos>,
    /// The message.
    pub message: String,
}

impl DeError {
    fn at(mut self, pos: Pos) -> Self {
        if self.pos.is_none() {
            self.pos = Some(pos);
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            pos: None,
            message: msg.to_string(),
        }
    }
}

/// Serde's view of a term: atoms `true`/`false` are booleans, `undefined` is "none",
/// other atoms and strings are strings, lists of character codes are strings when a
/// string is wanted, tuples and lists are sequences, and a list of `{Key, Value}` tuples
/// is a map.
pub struct TermDe<'t>(pub &'t Term);

impl TermDe<'_> {
    fn unexpected(&self) -> Unexpected<'_> {
        match &self.0.kind {
            TermKind::Atom(a) => Unexpected::Other(a.as_str()),
            TermKind::Int(i) => match i64::try_from(*i) {
                Ok(v) => Unexpected::Signed(v),
                Err(_) => Unexpected::Other("a large integer"),
            },
            TermKind::Float(x) => Unexpected::Float(*x),
            TermKind::Str(s) => Unexpected::Str(s),
            TermKind::Tuple(_) => Unexpected::Other("a tuple"),
            TermKind::List(_) => Unexpected::Seq,
        }
    }

    fn invalid<'de, V: Visitor<'de>>(&self, v: &V) -> DeError {
        let e: DeError = de::Error::invalid_type(self.unexpected(), v);
        // serde prints atoms as bare words; name them so the message is clear.
        let e = match &self.0.kind {
            TermKind::Atom(a) => DeError {
                pos: None,
                message: e.message.replacen(a, &format!("atom `{a}`"), 1),
            },
            _ => e,
        };
        e.at(self.0.pos)
    }

    fn int<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.0.kind {
            TermKind::Int(i) => {
                if let Ok(u) = u64::try_from(i) {
                    v.visit_u64(u)
                } else if let Ok(s) = i64::try_from(i) {
                    v.visit_i64(s)
                } else {
                    Err(de::Error::custom(format!("integer {i} is out of range")))
                }
            }
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }
}

fn char_list(items: &[Term]) -> Option<String> {
    items
        .iter()
        .map(|t| match t.kind {
            TermKind::Int(i) => u32::try_from(i).ok().and_then(char::from_u32),
            _ => None,
        })
        .collect()
}

/// The integer `deserialize_*` methods: every width is read by [`TermDe::int`], which
/// range-checks against the visitor.
macro_rules! deserialize_ints {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
                self.int(v)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for TermDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let pos = self.0.pos;
        match &self.0.kind {
            TermKind::Atom(a) if a == "true" => v.visit_bool(true),
            TermKind::Atom(a) if a == "false" => v.visit_bool(false),
            TermKind::Atom(a) => v.visit_str(a),
            TermKind::Int(_) => return self.int(v),
            TermKind::Float(x) => v.visit_f64(*x),
            TermKind::Str(s) => v.visit_str(s),
            TermKind::Tuple(items) | TermKind::List(items) => v.visit_seq(SeqDe(items.iter())),
        }
        .map_err(|e| e.at(pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Atom(a) if a == "true" => v.visit_bool(true),
            TermKind::Atom(a) if a == "false" => v.visit_bool(false),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Atom(a) => v.visit_str(a),
            TermKind::Str(s) => v.visit_str(s),
            TermKind::List(items) => match char_list(items) {
                Some(s) => v.visit_string(s),
                None => Err(self.invalid(&v)),
            },
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let pos = self.0.pos;
        match &self.0.kind {
            TermKind::Atom(a) if a == "undefined" => v.visit_none(),
            _ => v.visit_some(self),
        }
        .map_err(|e| e.at(pos))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Tuple(items) | TermKind::List(items) => v.visit_seq(SeqDe(items.iter())),
            TermKind::Str(s) if s.is_empty() => v.visit_seq(SeqDe([].iter())),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::List(items) => v.visit_map(MapDe::new(items.iter())),
            TermKind::Str(s) if s.is_empty() => v.visit_map(MapDe::new([].iter())),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }

    deserialize_ints! {
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
    }

    serde::forward_to_deserialize_any! {
        i128 u128 f32 f64 char bytes byte_buf unit unit_struct newtype_struct
        tuple_struct struct enum identifier
    }
}

struct SeqDe<'t>(std::slice::Iter<'t, Term>);

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self, seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.0.next() {
            Some(t) => seed.deserialize(TermDe(t)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// A list of `{Key, Value}` tuples read as a map.
struct MapDe<'t> {
    items: std::slice::Iter<'t, Term>,
    value: Option<&'t Term>,
    /// The current key, when it is a name, to prefix value errors with.
    key: Option<String>,
}

impl<'t> MapDe<'t> {
    fn new(items: std::slice::Iter<'t, Term>) -> Self {
        MapDe {
            items,
            value: None,
            key: None,
        }
    }
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self, seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let (key, value) = pair(item).map_err(|e| DeError {
            pos: Some(e.pos),
            message: e.message,
        })?;
        self.value = Some(value);
        self.key = match &key.kind {
            TermKind::Atom(a) | TermKind::Str(a) => Some(a.clone()),
            _ => None,
        };
        seed.deserialize(TermDe(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some(value) = self.value.take() else {
            return Err(de::Error::custom("value requested before its key"));
        };
        seed.deserialize(TermDe(value)).map_err(|mut e| {
            if let Some(k) = &self.key {
                e.message = format!("{k}: {}", e.message);
            }
            e
        })
    }
}
