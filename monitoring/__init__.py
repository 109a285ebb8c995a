"""The status server: read-only HTTP views of one trainbox home, plus the CLI's controls over HTTP.

It owns nothing on disk but the API token: it reads the status files, the spool folders, the run
folders and the model DB, and it steers the daemon only through the same control files as the CLI
(``trainbox.control.submit``) and the inbox (uploads). See ``monitoring/app.py`` for the routes.
"""
