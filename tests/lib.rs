//! Helpers shared by Weir's end-to-end tests (the `e2e` test binary).
