"""The codec path: config <- decode <- signals <- selection/scoring <- clip <- worker."""
