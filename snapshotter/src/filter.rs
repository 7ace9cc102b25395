//! containerd's filter syntax, as `List` (Walk) receives it.
//!
//! A filter is selectors joined by `,` (all must match); several filters in one request match
//! when any one does; no filter matches everything. A selector is a field path, optionally
//! followed by an operator and a value:
//!
//! ```text
//! name==sha256:abc            kind!=active          parent~=^default/
//! labels."containerd.io/snapshot.ref"        labels.team==infra
//! ```
//!
//! Field path parts are identifiers (`[A-Za-z0-9_]`) or double-quoted strings, joined by `.`.
//! A value is a double-quoted string, a `/regexp/` (after `~=`), or a run of characters up
//! to the next `,`. As in containerd, a path alone tests presence, `==` needs the field
//! present and equal, `!=` and `~=` compare the field's value ("" when absent).

use regex::Regex;

/// Errors parsing a filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid filter {filter:?} at byte {at}: {what}")]
    Syntax {
        filter: String,
        at: usize,
        what: &'static str,
    },
    #[error("invalid regular expression {pattern:?} in filter {filter:?}: {source}")]
    Regex {
        filter: String,
        pattern: String,
        source: Box<regex::Error>,
    },
}

#[derive(Debug)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Operator,
}

/// Parsed filters: any alternative matches when all of its selectors do.
#[derive(Debug, Default)]
pub struct Filters {
    alternatives: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses the filters of one request.
    pub fn parse(filters: &[String]) -> Result<Filters, FilterError> {
        let mut alternatives = Vec::new();
        for f in filters {
            let selectors = Parser::new(f).parse()?;
            if selectors.is_empty() {
                // An empty filter matches everything, so the whole set does.
                return Ok(Filters::default());
            }
            alternatives.push(selectors);
        }
        Ok(Filters { alternatives })
    }

    /// Whether the object whose fields `field` gives matches. `field(path)` returns the
    /// value at `path` and whether it is present.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        if self.alternatives.is_empty() {
            return true;
        }
        self.alternatives.iter().any(|sels| {
            sels.iter().all(|s| {
                let value = field(&s.path);
                match &s.op {
                    Operator::Present => value.is_some(),
                    Operator::Equal(v) => value.as_deref() == Some(v.as_str()),
                    Operator::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                    Operator::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
                }
            })
        })
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    fn err(&self, what: &'static str) -> FilterError {
        FilterError::Syntax {
            filter: self.text.to_string(),
            at: self.pos,
            what,
        }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    fn parse(mut self) -> Result<Vec<Selector>, FilterError> {
        let mut out = Vec::new();
        self.skip_space();
        if self.peek().is_none() {
            return Ok(out);
        }
        loop {
            out.push(self.selector()?);
            self.skip_space();
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    self.skip_space();
                }
                Some(_) => return Err(self.err("expected `,` or the end")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let rest = self.rest();
        let op = if rest.starts_with("==") || rest.starts_with("!=") || rest.starts_with("~=") {
            let op = &rest[..2];
            self.pos += 2;
            self.skip_space();
            let value = self.value(op == "~=")?;
            match op {
                "==" => Operator::Equal(value),
                "!=" => Operator::NotEqual(value),
                _ => {
                    Operator::Matches(Regex::new(&value).map_err(|source| FilterError::Regex {
                        filter: self.text.to_string(),
                        pattern: value.clone(),
                        source: Box::new(source),
                    })?)
                }
            }
        } else {
            Operator::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        if self.peek() == Some('"') {
            return self.quoted('"');
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.err("expected a field name"));
        }
        let s = self.rest()[..len].to_string();
        self.pos += len;
        Ok(s)
    }

    fn value(&mut self, regex: bool) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some('/') if regex => self.quoted('/'),
            _ => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                if len == 0 {
                    return Err(self.err("expected a value"));
                }
                let s = self.rest()[..len].to_string();
                self.pos += len;
                Ok(s)
            }
        }
    }

    /// A string between `delim`s; `\` escapes the delimiter and itself (and, in double
    /// quotes, `\n`, `\t`).
    fn quoted(&mut self, delim: char) -> Result<String, FilterError> {
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == delim => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, e)) if e == delim || e == '\\' => out.push(e),
                    Some((_, 'n')) if delim == '"' => out.push('\n'),
                    Some((_, 't')) if delim == '"' => out.push('\t'),
                    Some((_, e)) => {
                        // In a regexp, other escapes belong to the regexp.
                        out.push('\\');
                        out.push(e);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.err("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fields<'a>(
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Fn(&[String]) -> Option<String> + 'a {
        move |path: &[String]| match path.first().map(String::as_str) {
            Some("name") => Some(name.to_string()).filter(|n| !n.is_empty()),
            Some("labels") => labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }

    fn f(s: &[&str]) -> Filters {
        Filters::parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn selectors_and_alternatives() {
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:1".to_string(),
        );
        labels.insert("team".to_string(), "infra".to_string());
        let x = fields("ns/1/abc", &labels);

        assert!(f(&[]).matches(&x));
        assert!(f(&[""]).matches(&x));
        assert!(f(&["name==ns/1/abc"]).matches(&x));
        assert!(!f(&["name==other"]).matches(&x));
        assert!(f(&["name==other", "labels.team==infra"]).matches(&x));
        assert!(!f(&["name==ns/1/abc,labels.team==dev"]).matches(&x));
        assert!(f(&["name==ns/1/abc, labels.team"]).matches(&x));
        assert!(f(&[r#"labels."containerd.io/snapshot.ref"==sha256:1"#]).matches(&x));
        assert!(f(&[r#"labels."containerd.io/snapshot.ref""#]).matches(&x));
        assert!(!f(&["labels.missing"]).matches(&x));
        assert!(f(&["labels.missing!=x"]).matches(&x));
        assert!(f(&["name~=^ns/[0-9]+/"]).matches(&x));
        assert!(f(&["name~=/abc$/"]).matches(&x));
        assert!(!f(&["name~=\"^zzz\""]).matches(&x));
        assert!(f(&["name==\"ns/1/abc\""]).matches(&x));
    }

    #[test]
    fn bad_filters_are_refused_with_the_input() {
        for bad in [
            "name==",
            "==x",
            "name==a b",
            "labels.\"open",
            "name~=(",
            "name=x",
        ] {
            let e = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
