//! The error every SDK call returns when the host says no.

use lacewing_abi::Status;

/// A hostcall failed: the host's status, and which call it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    /// The hostcall, e.g. `proxy_get_property`.
    pub call: &'static str,
    /// What the host answered.
    pub status: Status,
}

impl core::fmt::Display for HostError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} failed: {:?}", self.call, self.status)
    }
}

impl std::error::Error for HostError {}

/// The result of an SDK call.
pub type Result<T> = core::result::Result<T, HostError>;

/// Turns a raw status code into `Ok(())` or a [`HostError`].
pub(crate) fn check(call: &'static str, code: u32) -> Result<()> {
    match Status::try_from(code) {
        Ok(Status::Ok) => Ok(()),
        Ok(status) => Err(HostError { call, status }),
        Err(_) => Err(HostError {
            call,
            status: Status::InternalFailure,
        }),
    }
}

/// `Ok(None)` for `NotFound`, so absent values are not errors.
pub(crate) fn optional<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(HostError {
            status: Status::NotFound,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}
