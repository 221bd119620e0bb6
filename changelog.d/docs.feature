Documentation site (tutorial, how-to recipes with tested examples, reference, migration guides from sslh, cmux and HAProxy, comparison) built with warnings as errors in CI.
