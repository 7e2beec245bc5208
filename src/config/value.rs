// SPDX-License-Identifier: Apache-2.0
//! How the configuration file's values are read: leniently.
//!
//! The derived structures of `file.rs` and `guest.rs` leave the keys to
//! serde (which names them, refuses unknown ones and, through
//! [`toml::Spanned`], keeps where each value is). Their values, though, are
//! read into the types here, which take a value of any TOML type and keep the
//! type found. Failing in serde's words instead ("invalid type: floating
//! point `1.5`, expected u64") would lose the key the value belongs to and
//! stop at the first such value in key order, not file order; the checks that
//! follow explain a wrong type in ours ("key 'reseed-secs': expected a whole
//! number, found float"), at the first mistake in the file.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// A single value: text, a whole number, or the kind of value found
/// instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    Text(String),
    Whole(u64),
    /// An integer below 0 or above `u64::MAX`. Its digits, and its sign,
    /// are in the text as written (see [`as_written`]).
    OutOfRange,
    /// A float, boolean, datetime, array or table, by its TOML name.
    Other(&'static str),
}

impl Found {
    /// The TOML name of the value's type, for "expected ..., found integer".
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            Found::Text(_) => "string",
            Found::Whole(_) | Found::OutOfRange => "integer",
            Found::Other(name) => name,
        }
    }
}

/// An array of `T` (each with its position), or the kind of value found
/// instead.
#[derive(Debug)]
pub(super) enum ListOr<T> {
    List(Vec<Spanned<T>>),
    Other(&'static str),
}

/// A table read as `T`, or the kind of value found instead.
#[derive(Debug)]
pub(super) enum TableOr<T> {
    Table(T),
    Other(&'static str),
}

/// An integer as written in `text` at `span`, without `_` separators: how
/// a number out of range is quoted back to the operator. Its sign tells
/// whether it is below 0 or too large.
pub(super) fn as_written(text: &str, span: Range<usize>) -> String {
    text.get(span).unwrap_or_default().replace('_', "")
}

/// Of the mistakes found while checking values, the one given first (in
/// the file, or on the command line). Every value is checked, but an
/// operator reading down the file is told of the first one, as serde reads
/// a table's keys sorted by name, not in file order.
#[derive(Debug)]
pub(super) struct Earliest<E> {
    first: Option<(usize, E)>,
}

impl<E> Default for Earliest<E> {
    fn default() -> Self {
        Earliest { first: None }
    }
}

impl<E> Earliest<E> {
    /// Checks `value`, if given, keeping a mistake that comes before those
    /// kept so far.
    pub(super) fn check<V, T>(
        &mut self,
        value: Option<Spanned<V>>,
        check: impl FnOnce(Spanned<V>) -> Result<T, E>,
    ) -> Option<T> {
        self.check_at(value, check).map(|(_, checked)| checked)
    }

    /// [`Earliest::check`], giving where the value starts with the result.
    pub(super) fn check_at<V, T>(
        &mut self,
        value: Option<Spanned<V>>,
        check: impl FnOnce(Spanned<V>) -> Result<T, E>,
    ) -> Option<(usize, T)> {
        let value = value?;
        let at = value.span().start;
        match check(value) {
            Ok(checked) => Some((at, checked)),
            Err(error) => {
                if self.first.as_ref().is_none_or(|(first, _)| at < *first) {
                    self.first = Some((at, error));
                }
                None
            }
        }
    }

    /// The first mistake, with where its value starts.
    pub(super) fn finish(self) -> Result<(), (usize, E)> {
        self.first.map_or(Ok(()), Err)
    }
}

/// toml hands a datetime to `deserialize_any` as a map with this one key.
const DATETIME_KEY: &str = "$__toml_private_datetime";

/// What a lenient type makes of each kind of TOML value. What a type does
/// not take is kept by its TOML name ([`Found::type_name`]), never refused.
trait Lenient<'de>: Sized {
    /// A string, a number or a boolean; by default, also an array, a table
    /// or a datetime, as [`Found::Other`].
    fn scalar(found: Found) -> Self;

    fn array<A: SeqAccess<'de>>(_seq: A) -> Result<Self, A::Error> {
        Ok(Self::scalar(Found::Other("array")))
    }

    fn table<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let kind = match map.next_key::<String>()? {
            Some(key) if key == DATETIME_KEY => "datetime",
            _ => "table",
        };
        Ok(Self::scalar(Found::Other(kind)))
    }
}

/// Reads any TOML value into `T`.
fn deserialize_lenient<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: Lenient<'de>,
    D: Deserializer<'de>,
{
    deserializer
        .deserialize_any(LenientVisitor(PhantomData))
        .or_else(|error| {
            // toml refuses, before any visitor sees them, integers beyond
            // 128 bits and floats beyond f64: those are values too, of a
            // known type.
            let message = error.to_string();
            if message.starts_with("integer number overflowed") {
                Ok(T::scalar(Found::OutOfRange))
            } else if message.starts_with("floating-point number overflowed") {
                Ok(T::scalar(Found::Other("float")))
            } else {
                Err(error)
            }
        })
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::scalar(Found::Other("boolean")))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        self.visit_i128(i128::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        Ok(T::scalar(Found::Whole(value)))
    }

    fn visit_i128<E: de::Error>(self, value: i128) -> Result<T, E> {
        Ok(T::scalar(
            u64::try_from(value).map_or(Found::OutOfRange, Found::Whole),
        ))
    }

    fn visit_u128<E: de::Error>(self, value: u128) -> Result<T, E> {
        Ok(T::scalar(
            u64::try_from(value).map_or(Found::OutOfRange, Found::Whole),
        ))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::scalar(Found::Other("float")))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        Ok(T::scalar(Found::Text(value.to_owned())))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<T, E> {
        Ok(T::scalar(Found::Text(value)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::array(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::table(map)
    }
}

impl Lenient<'_> for Found {
    fn scalar(found: Found) -> Self {
        found
    }
}

impl<'de> Deserialize<'de> for Found {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

impl<'de, T: Deserialize<'de>> Lenient<'de> for ListOr<T> {
    fn scalar(found: Found) -> Self {
        ListOr::Other(found.type_name())
    }

    fn array<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(ListOr::List(items))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

impl<'de, T: Deserialize<'de>> Lenient<'de> for TableOr<T> {
    fn scalar(found: Found) -> Self {
        TableOr::Other(found.type_name())
    }

    fn table<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        match T::deserialize(MapAccessDeserializer::new(map)) {
            Ok(table) => Ok(TableOr::Table(table)),
            // A datetime comes as a map (see DATETIME_KEY), whose key `T`
            // refuses as unknown; it is a value of the wrong type instead.
            Err(error) if error.to_string().contains(DATETIME_KEY) => {
                Ok(TableOr::Other("datetime"))
            }
            Err(error) => Err(error),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TableOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        #[allow(dead_code)]
        a: Option<Found>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        v: Spanned<Found>,
        list: Option<ListOr<Found>>,
        table: Option<TableOr<Strict>>,
    }

    fn doc(text: &str) -> Doc {
        match toml::from_str(text) {
            Ok(doc) => doc,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn every_toml_type_is_kept_by_name() {
        let cases = [
            ("\"x\"", "string"),
            ("5", "integer"),
            ("-5", "integer"),
            ("99999999999999999999", "integer"),
            ("999999999999999999999999999999999999999999999", "integer"),
            ("1.5", "float"),
            ("1e999", "float"),
            ("true", "boolean"),
            ("1979-05-27", "datetime"),
            ("1979-05-27T07:32:00Z", "datetime"),
            ("[1]", "array"),
            ("{ a = 1 }", "table"),
            ("{}", "table"),
        ];
        for (value, name) in cases {
            assert_eq!(
                doc(&format!("v = {value}")).v.get_ref().type_name(),
                name,
                "{value}"
            );
        }
    }

    #[test]
    fn integers_are_whole_or_out_of_range() {
        let found = |value: &str| doc(&format!("v = {value}")).v.into_inner();
        assert_eq!(found("0x10_00"), Found::Whole(4096));
        assert_eq!(found("-0"), Found::Whole(0));
        assert_eq!(found("18446744073709551615"), Found::Whole(u64::MAX));
        for out_of_range in [
            "18446744073709551616",
            "-1",
            "-99999999999999999999",
            "999999999999999999999999999999999999999999999",
            "-999999999999999999999999999999999999999999999",
        ] {
            assert_eq!(found(out_of_range), Found::OutOfRange, "{out_of_range}");
        }
    }

    #[test]
    fn numbers_out_of_range_are_quoted_as_written() {
        let text = "v = 99_999_999_999_999_999_999\n";
        let span = doc(text).v.span();
        assert_eq!(as_written(text, span), "99999999999999999999");
    }

    #[test]
    fn lists_and_tables_keep_what_they_are_not() {
        let d = doc("v = 1\nlist = [1, \"a\"]\ntable = { a = 2 }\n");
        let Some(ListOr::List(items)) = d.list else {
            panic!("{:?}", d.list)
        };
        let items: Vec<Found> = items.into_iter().map(Spanned::into_inner).collect();
        assert_eq!(items, [Found::Whole(1), Found::Text("a".into())]);
        assert!(matches!(d.table, Some(TableOr::Table(_))), "{:?}", d.table);
        let d = doc("v = 1\nlist = { a = 1 }\ntable = 1979-05-27\n");
        assert!(
            matches!(d.list, Some(ListOr::Other("table"))),
            "{:?}",
            d.list
        );
        assert!(
            matches!(d.table, Some(TableOr::Other("datetime"))),
            "{:?}",
            d.table
        );
        let d = doc("v = 1\nlist = 3\ntable = [1]\n");
        assert!(matches!(d.list, Some(ListOr::Other("integer"))));
        assert!(matches!(d.table, Some(TableOr::Other("array"))));
    }

    #[test]
    fn unknown_keys_inside_a_table_are_still_refused() {
        let error = toml::from_str::<Doc>("v = 1\ntable = { b = 1 }\n").unwrap_err();
        assert!(error.message().contains("unknown field `b`"), "{error}");
    }
}
