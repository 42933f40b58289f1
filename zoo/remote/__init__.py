"""Remote runs and run management: Modal submission, sync, listing, cleaning, downloads.

Only `zoo.remote.modal_app` imports `modal`.  Everything else works on a `RunStore` (a
directory tree with the Modal Volume's layout), so it is tested on plain local folders.
"""
