"""Provider batch APIs (OpenAI Files + Batches, Anthropic Message Batches): request and
result formats (``formats``), the HTTP client (``client``) and batch pricing
(``pricing``). Pure building blocks for issue #18; jobs are not routed through them yet.
"""
