// assemblyscript-filter: a proxy-wasm filter written with the AssemblyScript
// SDK (@solo-io/proxy-runtime, ABI 0.2.0). The e2e tests run it unmodified in
// Envoy and in Lacewing and compare what the client sees. The request header
// `x-case` picks what it does (the same cases as experimental-sdk-filter):
//
// - headers: adds `x-sdk-request: seen <x-in>` to the request, removes
//   `x-drop`; every response gets `x-sdk-response: yes`.
// - local-reply-empty-length: answers 403 with a body and a module-supplied
//   `content-length: 0`.
// - callout-host: calls cluster `echo` with `host` but no `:authority`, then
//   answers with the callout's response body.
// - callout-timeout: calls with a timeout of 0xffffffff ms (-1 as a signed
//   number) and reports the result in the request header `x-callout-result`.
// - duration: reports whether `request.duration` is found, in the request and
//   the response phase (`x-duration-request`, `x-duration-response`).
// - ticks: reports in `x-ticks` how often this VM's root context ticked (every
//   50 ms from on_configure).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, continue_request, HeaderPair, Headers, GrpcStatusValues, WasmResultValues,
} from "@solo-io/proxy-runtime";

@external("env", "proxy_get_property")
declare function proxy_get_property(path_ptr: usize, path_size: usize, value_ptr_ptr: usize, value_size_ptr: usize): u32;

@external("env", "proxy_set_tick_period_milliseconds")
declare function proxy_set_tick_period_milliseconds(period: u32): u32;

@external("env", "proxy_get_buffer_bytes")
declare function proxy_get_buffer_bytes(typ: u32, start: u32, length: u32, ptr_ptr: usize, size_ptr: usize): u32;

/// Response body of an HTTP callout, in `proxy_get_buffer_bytes` numbering.
const HTTP_CALL_RESPONSE_BODY: u32 = 4;

let ticks: u32 = 0;

/// "found" or "not found", by the host's answer for `path`.
function propertyStatus(path: string): string {
  let name = String.UTF8.encode(path);
  let out = new ArrayBuffer(8);
  let at = changetype<usize>(out);
  let result = proxy_get_property(changetype<usize>(name), name.byteLength, at, at + 4);
  if (result == WasmResultValues.Ok) return "found";
  if (result == WasmResultValues.NotFound) return "not found";
  return "status " + result.toString();
}

/// The SDK status names the tests compare.
function statusName(result: WasmResultValues): string {
  if (result == WasmResultValues.Ok) return "Ok";
  if (result == WasmResultValues.BadArgument) return "BadArgument";
  return "status " + result.toString();
}

/// The first `size` bytes of the callout's response body.
function calloutBody(size: u32): ArrayBuffer {
  let out = new ArrayBuffer(8);
  let at = changetype<usize>(out);
  if (proxy_get_buffer_bytes(HTTP_CALL_RESPONSE_BODY, 0, size, at, at + 4) != WasmResultValues.Ok) {
    return new ArrayBuffer(0);
  }
  let data = load<u32>(at);
  let length = load<u32>(at + 4);
  let body = new ArrayBuffer(length);
  memory.copy(changetype<usize>(body), data, length);
  return body;
}

function pair(name: string, value: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(name), String.UTF8.encode(value));
}

class CaseRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new CaseFilter(context_id, this);
  }

  // The SDK's own onConfigure reads the configuration even when it is empty,
  // and then frees a stale buffer; this module needs no configuration.
  onConfigure(configuration_size: u32): bool {
    proxy_set_tick_period_milliseconds(50);
    return true;
  }

  onTick(): void {
    ticks += 1;
  }
}

class CaseFilter extends Context {
  case_: string = "";
  durationAtRequest: string = "";

  constructor(context_id: u32, root_context: CaseRoot) {
    super(context_id, root_context);
  }

  call(authority: string, authorityValue: string, timeout: u32): WasmResultValues {
    let headers: Headers = [pair(":method", "GET"), pair(":path", "/from-sdk"), pair(authority, authorityValue)];
    return this.root_context.httpCall("echo", headers, new ArrayBuffer(0), [], timeout, this,
      (origin: Context, headers: u32, body_size: usize, trailers: u32): void => {
        let filter = origin as CaseFilter;
        if (filter.case_ == "callout-host") {
          send_local_response(200, "", calloutBody(body_size as u32), [], GrpcStatusValues.Unknown);
        } else {
          stream_context.headers.request.add("x-callout-result", "Ok");
          continue_request();
        }
      });
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.case_ = stream_context.headers.request.get("x-case");
    if (this.case_ == "headers") {
      stream_context.headers.request.add("x-sdk-request", "seen " + stream_context.headers.request.get("x-in"));
      stream_context.headers.request.remove("x-drop");
    } else if (this.case_ == "local-reply-empty-length") {
      let extra: Headers = [pair("content-length", "0"), pair("x-local", "assemblyscript")];
      send_local_response(403, "", String.UTF8.encode("denied by the AssemblyScript SDK filter"), extra, GrpcStatusValues.Unknown);
      return FilterHeadersStatusValues.StopIteration;
    } else if (this.case_ == "callout-host" || this.case_ == "callout-timeout") {
      let byHost = this.case_ == "callout-host";
      let result = byHost ? this.call("host", "callout.sdk.test", 5000) : this.call(":authority", "callout.sdk.test", 0xffffffff);
      if (result == WasmResultValues.Ok) return FilterHeadersStatusValues.StopIteration;
      stream_context.headers.request.add("x-callout-result", statusName(result));
    } else if (this.case_ == "duration") {
      this.durationAtRequest = propertyStatus("request.duration");
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-sdk-response", "yes");
    if (this.case_ == "duration") {
      stream_context.headers.response.add("x-duration-request", this.durationAtRequest);
      stream_context.headers.response.add("x-duration-response", propertyStatus("request.duration"));
    } else if (this.case_ == "ticks") {
      stream_context.headers.response.add("x-ticks", ticks.toString());
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => { return new CaseRoot(context_id); }, "sdk_cases");
