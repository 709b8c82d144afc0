"""HTTP surfaces: the routes (``routes``), the request context every call passes
(``context``), the answers and errors they render (``rendering``, ``problems``,
``wire_errors``), the OpenAPI document, and the operations listener's app."""
