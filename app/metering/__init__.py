"""The metering domain: what AWS Marketplace Metering takes, and the rules around it.

Pure values and functions, no I/O; every adapter (``app.api``, ``app.aws``,
``app.queue``) depends on this package, never the other way round:

    shapes     the request and result shapes, AWS's field names
    rules      checks that span fields: quantities, allocations, windows, grains
    billing    hours, submission windows, quantities compared by value
    grains     billing grains: their key and how usage sums into one
    limits     AWS's limits on a call and a record
    codes      AWS's error codes no model lists, by what they say about the usage
    protocol   AWS's JSON 1.1 wire form: targets, bodies, errors
    errors     the error tree every caller sees, and AWS's codes as HTTP statuses
"""
