//! The proxy-wasm ABI contract shared by the Lacewing host and SDK.
//!
//! Numbered enums ([`Status`], [`LogLevel`], [`Action`], [`BufferType`], [`MapType`],
//! [`PeerType`], [`StreamType`], [`MetricType`]), the ABI versions and the names of
//! their imports and exports ([`names`]), the header-map pairs codec ([`pairs`]) and
//! property paths ([`property`]). No dependencies, `no_std` + `alloc`.
#![no_std]
extern crate alloc;

pub mod names;
pub mod pairs;
pub mod property;

/// Declares a `#[repr(u32)]` enum with a fallible conversion from the wire value.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl TryFrom<u32> for $name {
            type Error = UnknownValue;
            fn try_from(value: u32) -> Result<Self, UnknownValue> {
                match value {
                    $($value => Ok(Self::$variant),)+
                    other => Err(UnknownValue { kind: stringify!($name), value: other }),
                }
            }
        }

        impl From<$name> for u32 {
            fn from(value: $name) -> u32 {
                value as u32
            }
        }
    };
}

/// A wire value that names no variant of the enum it was decoded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownValue {
    /// The enum being decoded.
    pub kind: &'static str,
    /// The value received.
    pub value: u32,
}

impl core::fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} is not a valid {}", self.value, self.kind)
    }
}

impl core::error::Error for UnknownValue {}

wire_enum!(
    /// `proxy_status_t`: the result of every hostcall.
    Status {
        Ok = 0,
        NotFound = 1,
        BadArgument = 2,
        SerializationFailure = 3,
        ParseFailure = 4,
        InvalidMemoryAccess = 6,
        Empty = 7,
        CasMismatch = 8,
        InternalFailure = 10,
        Unimplemented = 12,
    }
);

impl Status {
    /// The value as the `i32` a hostcall returns to the guest.
    pub const fn code(self) -> i32 {
        self as i32
    }
}

wire_enum!(
    /// `proxy_log_level_t`.
    LogLevel {
        Trace = 0,
        Debug = 1,
        Info = 2,
        Warn = 3,
        Error = 4,
        Critical = 5,
    }
);

wire_enum!(
    /// `proxy_action_t`: what a stream callback asks the host to do next.
    Action {
        Continue = 0,
        Pause = 1,
    }
);

wire_enum!(
    /// `proxy_buffer_type_t`.
    BufferType {
        HttpRequestBody = 0,
        HttpResponseBody = 1,
        DownstreamData = 2,
        UpstreamData = 3,
        HttpCallResponseBody = 4,
        GrpcReceiveBuffer = 5,
        VmConfiguration = 6,
        PluginConfiguration = 7,
        ForeignFunctionArguments = 8,
    }
);

wire_enum!(
    /// `proxy_map_type_t`.
    MapType {
        HttpRequestHeaders = 0,
        HttpRequestTrailers = 1,
        HttpResponseHeaders = 2,
        HttpResponseTrailers = 3,
        GrpcReceiveInitialMetadata = 4,
        GrpcReceiveTrailingMetadata = 5,
        HttpCallResponseHeaders = 6,
        HttpCallResponseTrailers = 7,
    }
);

wire_enum!(
    /// `proxy_peer_type_t`: who closed a connection.
    PeerType {
        Unknown = 0,
        Local = 1,
        Remote = 2,
    }
);

wire_enum!(
    /// `proxy_stream_type_t`.
    StreamType {
        HttpRequest = 0,
        HttpResponse = 1,
        Downstream = 2,
        Upstream = 3,
    }
);

wire_enum!(
    /// `proxy_metric_type_t`.
    MetricType {
        Counter = 0,
        Gauge = 1,
        Histogram = 2,
    }
);

/// The ABI versions a module may advertise, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbiVersion {
    V0_1_0,
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    /// Every version, oldest first.
    pub const ALL: [AbiVersion; 3] = [Self::V0_1_0, Self::V0_2_0, Self::V0_2_1];

    /// The empty function a module exports to advertise this version.
    pub const fn marker(self) -> &'static str {
        match self {
            Self::V0_1_0 => "proxy_abi_version_0_1_0",
            Self::V0_2_0 => "proxy_abi_version_0_2_0",
            Self::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// The version advertised by an export name, if it is a version marker.
    pub fn from_marker(export: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.marker() == export)
    }

    /// Dotted form, e.g. `0.2.1`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::V0_1_0 => "0.1.0",
            Self::V0_2_0 => "0.2.0",
            Self::V0_2_1 => "0.2.1",
        }
    }

    /// Whether header callbacks take the `end_of_stream` argument (0.2.0 on).
    pub const fn headers_have_end_of_stream(self) -> bool {
        !matches!(self, Self::V0_1_0)
    }

    /// The host imports a module of this version may use (module `env`).
    pub const fn imports(self) -> &'static [&'static str] {
        match self {
            Self::V0_1_0 => names::IMPORTS_0_1_0,
            Self::V0_2_0 => names::IMPORTS_0_2_0,
            Self::V0_2_1 => names::IMPORTS_0_2_1,
        }
    }

    /// The callbacks a module of this version may export.
    pub const fn exports(self) -> &'static [&'static str] {
        match self {
            Self::V0_1_0 => names::EXPORTS_0_1_0,
            Self::V0_2_0 | Self::V0_2_1 => names::EXPORTS_0_2_X,
        }
    }
}

impl core::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_and_reject_gaps() {
        for code in [0u32, 1, 2, 3, 4, 6, 7, 8, 10, 12] {
            assert_eq!(u32::from(Status::try_from(code).unwrap()), code);
        }
        for gap in [5u32, 9, 11, 13, u32::MAX] {
            assert!(Status::try_from(gap).is_err());
        }
        assert_eq!(
            BufferType::try_from(8),
            Ok(BufferType::ForeignFunctionArguments)
        );
        assert!(BufferType::try_from(9).is_err());
        assert_eq!(MapType::try_from(7), Ok(MapType::HttpCallResponseTrailers));
        assert_eq!(LogLevel::try_from(5), Ok(LogLevel::Critical));
        assert_eq!(StreamType::try_from(3), Ok(StreamType::Upstream));
        assert_eq!(MetricType::try_from(2), Ok(MetricType::Histogram));
        assert_eq!(PeerType::try_from(2), Ok(PeerType::Remote));
        assert_eq!(Action::try_from(1), Ok(Action::Pause));
        let err = Action::try_from(7).unwrap_err();
        assert_eq!(alloc::format!("{err}"), "7 is not a valid Action");
    }

    #[test]
    fn version_markers() {
        for v in AbiVersion::ALL {
            assert_eq!(AbiVersion::from_marker(v.marker()), Some(v));
        }
        assert_eq!(AbiVersion::from_marker("proxy_abi_version_0_x_x"), None);
        assert!(!AbiVersion::V0_1_0.headers_have_end_of_stream());
        assert!(
            AbiVersion::V0_2_1
                .imports()
                .contains(&"proxy_get_log_level")
        );
        assert!(
            !AbiVersion::V0_2_0
                .imports()
                .contains(&"proxy_get_log_level")
        );
        assert!(
            AbiVersion::V0_1_0
                .imports()
                .contains(&"proxy_get_configuration")
        );
    }
}
