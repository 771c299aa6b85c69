#include "request.h"

#include <algorithm>

namespace kestrel {

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
  }
  return "unknown";
}

namespace {
bool contains(const std::vector<int32_t>& ids, int32_t token) {
  return std::find(ids.begin(), ids.end(), token) != ids.end();
}
}  // namespace

FinishReason append_token_and_check_stop(Request& request, int32_t token, int32_t max_model_len) {
  request.token_ids.push_back(token);
  const StopCriteria& stop = request.stop;
  if (request.num_output_tokens() >= stop.min_tokens) {
    if (contains(stop.stop_token_ids, token)) return FinishReason::kStop;
    if (!stop.ignore_eos && contains(stop.eos_token_ids, token)) return FinishReason::kStop;
  }
  if (request.num_output_tokens() >= stop.max_tokens) return FinishReason::kLength;
  if (request.num_tokens() >= max_model_len) return FinishReason::kLength;
  return FinishReason::kNone;
}

}  // namespace kestrel
