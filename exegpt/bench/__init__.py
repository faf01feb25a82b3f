"""`exegpt bench`: an open-loop benchmark client for the OpenAI-compatible HTTP gateway.

`workload_plan` turns a workload (a paper task or an Azure trace) into planned requests,
`client` sends them over HTTP and streams the answers, `metrics` turns the per-request records
into a report, and `cli` ties them together.
"""
