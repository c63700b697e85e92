"""Running a model over prompts: options, prompts, plan, schedule, capture, sink, processes, the loop."""
