//! Identifiers that end up in SQL: make slugs become table names (`ads_<slug>`).

/// A make slug is lower-case ASCII letters, digits and underscores, starting with a letter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid make slug {slug:?}: use lower-case ascii letters, digits and '_', starting with a letter")]
pub struct IdentError {
    pub slug: String,
}

pub fn validate_slug(slug: &str) -> Result<&str, IdentError> {
    let mut chars = slug.chars();
    let ok = matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && slug.len() <= 57; // ads_ + slug + _legacy fits in NAMEDATALEN-1 = 63
    if ok { Ok(slug) } else { Err(IdentError { slug: slug.to_string() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(validate_slug("vw").is_ok());
        assert!(validate_slug("mercedes_benz").is_ok());
        assert!(validate_slug("Vw").is_err());
        assert!(validate_slug("").is_err());
        assert!(validate_slug("1series").is_err());
        assert!(validate_slug("vw; drop table x").is_err());
        assert!(validate_slug(&"a".repeat(58)).is_err());
    }
}
