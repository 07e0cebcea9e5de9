"""Models: loading them safely, their identity, and the merged model run a layer at a time."""
