"""The merge and package phases and what follows them: merging with its parity gate, the
package (manifest, model card), exports and the server."""
