// Status: the error channel of the native core. User-caused errors return a Status naming the
// bad value and the allowed range; the core's state is unchanged when a call fails.
#pragma once

#include <string>
#include <utility>

namespace kestrel {

enum class StatusCode {
  kOk,
  kInvalidArgument,    // a value out of its allowed range
  kNotFound,           // unknown request id
  kAlreadyExists,      // duplicate request id
  kResourceExhausted,  // can never fit in the KV cache
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string msg) {
    return {StatusCode::kInvalidArgument, std::move(msg)};
  }
  static Status NotFound(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
  static Status AlreadyExists(std::string msg) {
    return {StatusCode::kAlreadyExists, std::move(msg)};
  }
  static Status ResourceExhausted(std::string msg) {
    return {StatusCode::kResourceExhausted, std::move(msg)};
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(StatusCode code, std::string msg) : code_(code), message_(std::move(msg)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace kestrel
