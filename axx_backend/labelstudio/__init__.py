"""Label Studio I/O: labeling config, image fetching, prediction JSON and the API client."""
